"""Shard step: a source of images -> webdataset ``.tar`` shards, written in parallel by Ray tasks.

The sorted source items are cut into chunks of ``items_per_task`` (default: samples_per_shard); one Ray task per chunk decodes,
normalises (see ``images.py``) and encodes its images and writes ``train/shard-CCCCC-PPP.tar`` and
``val/shard-CCCCC-PPP.tar`` (C: chunk, P: part) with webdataset's ``TarWriter``, uploading each
shard as soon as it is closed. Outputs depend only on the source and the config, never on the
number of workers, and re-running gives byte-identical shards (fixed tar mtime/owner/mode, sorted
sample fields, canonical JSON).

A sample holds ``<key>.png`` (or ``.jpg``/``.webp``), ``<key>.cls`` (class index, labelled sources
only), ``<key>.json`` (``source``: path within the source, ``class``: name or null,
``original_size``: [w, h], ``original_mode``) and, when ``captions`` is set, ``<key>.txt`` (the
caption, UTF-8; see ``captions.py``). A sample goes to validation when
sha256(key), read as a fraction of 2**64, is below ``val_fraction``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

from PIL import Image

from components.common.parallel import bounded_imap
from components.common.progress import progress_bar
from components.common.step import Manifest, StepContext, StepOutput
from components.common.storage import Storage
from components.common.tracking import png_bytes
from components.shard.captions import (BAD_CAPTION_KINDS, CAPTION_KEY, BadCaption, CaptionPlan, caption_fingerprint,
                                       caption_plan, hidden_names)
from components.shard.config import ShardConfig
from components.shard.contact_sheet import SheetPicker, contact_sheet, merge
from components.shard.images import BadSample, decode, encode, prepare
from components.shard.sources import ShardError, Source, SourceItem, open_source

CODE_VERSION = "1"  # the cache key also holds source_fingerprint(cfg): new images re-run the step
SPLITS = ("train", "val")
UNLABELLED = "unlabelled"  # the class key of ``info.counts`` for an unlabelled source
MAX_SKIPPED_LISTED = 1000
CONTACT_SHEET = "contact_sheet.png"

log = logging.getLogger(__name__)

__all__ = ["CODE_VERSION", "ShardError", "run", "is_val", "shard_name", "source_fingerprint"]


def source_fingerprint(cfg: ShardConfig) -> str:
    """The source's current content as a digest (see ``source_probe.source_fingerprint``)."""
    from components.shard.source_probe import source_fingerprint as fingerprint

    digest = fingerprint(cfg.source)
    if cfg.caption_file():  # a changed captions file re-runs the step (sidecars are in the source's listing)
        listed = json.dumps(caption_fingerprint(cfg.caption_file()), separators=(",", ":")).encode()
        digest += f"+captions-{hashlib.sha256(listed).hexdigest()[:32]}"
    return digest


def is_val(key: str, val_fraction: float) -> bool:
    fraction = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    return fraction < val_fraction


def shard_name(split: str, chunk: int, part: int) -> str:
    return f"{split}/shard-{chunk:05d}-{part:03d}.tar"


# ------------------------------------------------------------------ writing


TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to whole records on close


def tar_member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK  # ustar header + data padded to blocks


def tar_file_bytes(members_bytes: int) -> int:
    return -(-(members_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


class SplitWriter:
    """Shards of one split of one chunk: webdataset ``TarWriter`` with rotation that honours both
    limits exactly. The byte limit counts the real tar size (headers, padding, end records), and a
    sample that would push a non-empty shard past it starts the next shard; a single sample larger
    than the limit gets a shard of its own."""

    def __init__(self, scratch: Path, output: Storage, split: str, chunk: int,
                 max_count: int | None, max_bytes: int | None):
        self.scratch, self.output, self.split, self.chunk = scratch, output, split, chunk
        self.max_count, self.max_bytes = max_count, max_bytes
        self.files: list[str] = []
        self.file_counts: list[int] = []  # samples in each of ``files``: streams plan epochs with them
        self.writer = None
        self.count = self.members_bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        added = sum(tar_member_bytes(len(v)) for k, v in sample.items() if k != "__key__")
        if self.writer is not None and (
            (self.max_count is not None and self.count >= self.max_count)
            or (self.max_bytes is not None and tar_file_bytes(self.members_bytes + added) > self.max_bytes)
        ):
            self.finish()
        if self.writer is None:
            self.open()
        self.writer.write(sample)
        self.count += 1
        self.members_bytes += added

    def open(self) -> None:
        import webdataset as wds

        rel = shard_name(self.split, self.chunk, len(self.files))
        self.path = self.scratch / rel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(self.path, "wb")
        # Fixed mtime, owner and mode: the same samples always give the same bytes. mtime must be
        # an int: tarfile's default (PAX) format adds an extended header per member for a float.
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=0, user="latentflow",
                                    group="latentflow", mode=0o444)
        self.files.append(rel)
        self.count = self.members_bytes = 0

    def finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.stream.close()
        self.file_counts.append(self.count)
        self.output.upload(self.files[-1], self.path)
        self.path.unlink()
        self.writer = None


def encode_sample(item: SourceItem, image: Image.Image, meta: dict, cfg: ShardConfig,
                  caption: bytes | None = None) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": item.key, cfg.image_format: encode(image, cfg.image_format, cfg.jpeg_quality)}
    if item.label is not None:
        sample["cls"] = str(item.label).encode("ascii")
    sample["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if caption is not None:
        sample[CAPTION_KEY] = caption
    return sample


def handle_bad_caption(caption: BadCaption, cfg: ShardConfig, skipped: list[dict[str, str]]) -> bytes | None:
    """A bad caption under ``skip`` (None: the sample is skipped, and listed) or ``keep_empty`` (b"")."""
    keep = cfg.on_bad_caption == "keep_empty"
    log.warning("shard: %s: %s (%s)", caption.file, caption.reason, "kept with an empty caption" if keep else "skipped")
    if keep:
        return b""
    skipped.append({"file": caption.file, "reason": caption.reason, "kind": f"caption_{caption.kind}"})
    return None


def shard_chunk(chunk: int, items: list[SourceItem], source: Source, cfg: ShardConfig,
                output: Storage, captions: CaptionPlan | None = None) -> dict[str, Any]:
    """One Ray task: read, check, normalise and write one chunk of items; return what it did.

    Under ``on_bad_sample: fail`` the first bad file ends the task with ``{"error": ...}``, and
    under ``on_bad_caption: fail`` the first bad caption."""
    scratch = Path(tempfile.mkdtemp(prefix=f"latentflow-shard-{chunk:05d}-"))  # this task's machine
    writers = {split: SplitWriter(scratch, output, split, chunk, cfg.samples_per_shard, cfg.max_shard_bytes)
               for split in SPLITS}
    counts = {split: Counter() for split in SPLITS}
    skipped: list[dict[str, str]] = []
    picker = SheetPicker(cfg.contact_sheet_seed)
    chunk_captions = captions.for_chunk(items, source) if captions is not None else {}
    bad_captions: Counter = Counter()
    try:
        for item, name, payload, extra in source.read_chunk(items, captions.members(source) if captions else ()):
            try:
                if isinstance(payload, BadSample):
                    raise payload
                image = payload if isinstance(payload, Image.Image) else decode(payload, name)
                original = {"original_size": list(image.size), "original_mode": image.mode}
                image = prepare(image, cfg.channels, cfg.image_size)
            except BadSample as bad:
                if cfg.on_bad_sample == "fail":
                    return {"chunk": chunk, "error": {"file": name, "reason": bad.reason, "policy": "on_bad_sample"}}
                log.warning("shard: skipping %s: %s", name, bad.reason)
                skipped.append({"file": name, "reason": bad.reason, "kind": bad.kind})
                continue
            caption = captions.caption(item, source, chunk_captions, extra) if captions is not None else None
            if isinstance(caption, BadCaption):
                bad_captions[caption.kind] += 1
                if cfg.on_bad_caption == "fail":
                    return {"chunk": chunk, "error": {"file": caption.file, "reason": caption.reason,
                                                      "policy": "on_bad_caption"}}
                caption = handle_bad_caption(caption, cfg, skipped)
                if caption is None:
                    continue
            source_path = f"{item.ref}#{item.member}" if item.member else item.ref
            meta = {"source": source_path, "class": item.class_name, **original}
            split = "val" if is_val(item.key, cfg.val_fraction) else "train"
            writers[split].write(encode_sample(item, image, meta, cfg, caption))
            counts[split][item.class_name if item.class_name is not None else UNLABELLED] += 1
            picker.offer(item.key, image)
        for writer in writers.values():
            writer.finish()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"chunk": chunk, "error": None, "files": {s: w.files for s, w in writers.items()},
            "file_counts": {s: w.file_counts for s, w in writers.items()},
            "counts": {s: dict(c) for s, c in counts.items()}, "skipped": skipped,
            "sheet": picker.picked(), "bad_captions": dict(bad_captions)}


# ------------------------------------------------------------------ the step


def run_chunks(chunks: list[list[SourceItem]], source: Source, cfg: ShardConfig, ctx: StepContext,
               total: int, captions: CaptionPlan | None = None) -> list[dict[str, Any]]:
    """One Ray task per chunk, at most ``num_workers`` in flight; a progress bar of samples written."""
    results: list[dict[str, Any]] = []
    skipped = 0
    jobs = ((index, chunk, source, cfg, ctx.output, captions) for index, chunk in enumerate(chunks))
    with closing(progress_bar(total, "samples written", unit="sample", channel=ctx.tracker.progress)) as bar:
        for result in bounded_imap(shard_chunk, jobs, ctx.resources.num_workers, ctx.resources.cpus_per_worker):
            if result["error"]:
                bad = result["error"]
                raise ShardError(f"bad input file {bad['file']}: {bad['reason']} ({bad['policy']}: fail)")
            results.append(result)
            skipped += len(result["skipped"])
            bar.update(sum(sum(c.values()) for c in result["counts"].values()))
            if skipped:
                bar.set_description(f"samples written ({skipped} skipped)")
    return sorted(results, key=lambda r: r["chunk"])


def run(cfg: ShardConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    source = open_source(cfg.source, hidden_names(cfg))
    items, rejected = source.list_items()
    if cfg.max_samples is not None:
        items = items[: cfg.max_samples]
    skipped: list[dict[str, str]] = []
    for bad in rejected:
        if cfg.on_bad_sample == "fail":
            raise ShardError(f"bad input file {bad.file}: {bad.reason} (on_bad_sample: fail)")
        log.warning("shard: skipping %s: %s", bad.file, bad.reason)
        skipped.append({"file": bad.file, "reason": bad.reason, "kind": bad.kind})
    if not items:
        raise ShardError(f"source has no image files: {source.uri}")

    per_task = cfg.task_items()
    chunks = [items[i : i + per_task] for i in range(0, len(items), per_task)]
    captions = caption_plan(cfg)
    results = run_chunks(chunks, source, cfg, ctx, total=len(items), captions=captions)

    class_order = list(source.classes) if source.classes is not None else [UNLABELLED]
    counts = {split: {c: 0 for c in class_order} for split in SPLITS}
    shards: dict[str, list[str]] = {split: [] for split in SPLITS}
    shard_counts: dict[str, list[int]] = {split: [] for split in SPLITS}
    for result in results:
        skipped.extend(result["skipped"])
        for split in SPLITS:
            shards[split].extend(result["files"][split])
            shard_counts[split].extend(result["file_counts"][split])
            for name, n in result["counts"][split].items():
                counts[split][name] = counts[split].get(name, 0) + n
    num = {split: sum(counts[split].values()) for split in SPLITS}
    if num["train"] + num["val"] == 0:
        raise ShardError(f"no valid image in source {source.uri} ({len(skipped)} files skipped, "
                         f"e.g. {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else
                         f"no valid image in source {source.uri}")

    sheet = contact_sheet(merge([c for r in results for c in r["sheet"]]))
    ctx.output.write_bytes(CONTACT_SHEET, png_bytes(sheet))
    ctx.tracker.log_image(sheet, CONTACT_SHEET)

    by_kind = Counter(s["kind"] for s in skipped)
    files = shards["train"] + shards["val"] + [CONTACT_SHEET]
    info = {
        "source": cfg.source,
        "classes": list(source.classes) if source.classes is not None else None,
        "counts": counts,
        "skipped": [{"file": s["file"], "reason": s["reason"]} for s in skipped[:MAX_SKIPPED_LISTED]],
        "num_skipped": len(skipped),
        "skipped_by_kind": dict(sorted(by_kind.items())),
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "image_format": cfg.image_format,
        "train_shards": shards["train"],
        "val_shards": shards["val"],
        "train_counts": shard_counts["train"],  # samples per shard, in the order above
        "val_counts": shard_counts["val"],
        "on_bad_sample": cfg.on_bad_sample,  # what readers of these shards do with a sample they cannot use
    }
    metrics = {"num_train": num["train"], "num_val": num["val"], "num_skipped": len(skipped),
               "num_shards": len(shards["train"]) + len(shards["val"])}
    if captions is not None:  # nothing added otherwise: the manifest of a caption-less step is as before
        caption_facts(cfg, captions, results, info, metrics)
    log.info("shard: %d train + %d val samples in %d shards, %d skipped", num["train"], num["val"],
             metrics["num_shards"], len(skipped))
    return StepOutput(files=files, metrics={k: float(v) for k, v in metrics.items()}, info=info)


def caption_facts(cfg: ShardConfig, captions: CaptionPlan, results: list[dict[str, Any]], info: dict,
                  metrics: dict) -> None:
    """The captions' facts in the manifest: their source, the bad ones by kind, and for
    ``attributes`` the thresholds the evaluate step measures generated samples against."""
    bad = Counter()
    for result in results:
        bad.update(result["bad_captions"])
    info["captions"] = cfg.captions
    info["on_bad_caption"] = cfg.on_bad_caption
    info["bad_captions_by_kind"] = {kind: bad.get(kind, 0) for kind in BAD_CAPTION_KINDS}
    if cfg.captions == "attributes":
        from components.shard.digit_attributes import SLANT_DEAD_ZONE, THICKNESS

        info["caption_attributes"] = {"ink_tertiles": captions.tertiles, "slant_dead_zone": SLANT_DEAD_ZONE,
                                      "thickness": list(THICKNESS), "measured_on": "the 28x28 source pixels"}
    metrics["num_bad_captions"] = sum(bad.values())
    metrics.update({f"bad_captions_{kind}": bad.get(kind, 0) for kind in BAD_CAPTION_KINDS})
    log.info("shard: captions from %s, bad captions %s (%s)", cfg.captions, dict(bad) or "none", cfg.on_bad_caption)
