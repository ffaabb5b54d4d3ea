"""Latents step: encode every image of the shard step once with the trained autoencoder.

Ray Data batch inference: one row per input shard (split, index, rel) goes through ``map_batches``
into a fixed pool of ``ShardEncoder`` actors (``num_workers`` of them, never more than there are
shards), each with ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs from the step's resources.
An actor loads the autoencoder once, onto its GPU when Ray gave it one, then encodes one whole shard
per call: it streams the shard's samples (decode, resize to the autoencoder's base size), encodes
them in chunks of ``batch_size`` images (posterior mode, or one sample per image seeded by its
key), multiplies by the scale factor and appends each chunk to the latent shard as it is encoded.
Memory per actor is the model plus one chunk of ``batch_size`` images, whatever the shard's size.
Before the pool starts, a pool the cluster can never hold is refused, naming the setting.

The output is ``train/latents-XXXXX.tar`` (XXXXX: the input shard's index in
``info["train_shards"]``; val alike), written with webdataset's ``TarWriter`` to a scratch file and
then uploaded (a shard appears whole or not at all): ``<key>.latent.npy`` ((c, h, w), ``dtype``),
``<key>.cls`` when labelled and ``<key>.txt`` (the caption, bytes unchanged) when the image shard has
one. With ``text_encoder`` (a frozen CLIP/T5 directory; the pipeline config fills it from ``dit.text``
when ``dit.text.precompute``) each actor also loads that encoder once and encodes each chunk's captions
with it, in the same chunks: ``<key>.context.npy`` (the caption's real tokens, (L_i, D), ``dtype``) and
``<key>.pooled.npy`` ((D,)); the step writes the null (the empty caption's encoding) once,
``text_null.safetensors``, and records the encoder (kind, path, max_tokens, its files' sha256) in
``info["text_encoder"]`` (``components.text.stored``). Bytes are deterministic (fixed mtime/owner/mode, sample order of the
input shard, the same chunk boundaries for the same ``batch_size``), so re-running writes identical
shards, and ``encode_shard`` in one process writes the same bytes as the pool when it runs as many
torch threads as an actor does (BLAS rounding depends on it). Read them with
``components.latents.load``.

A VQ autoencoder's latents are its encoder's pre-quantisation outputs (LDM): the codebook is
applied when they are decoded. Its encoder is deterministic, so ``posterior: sample`` is refused.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from components.autoencoder.load import AE_META, AutoencoderMeta
from components.common.data import CONTEXT_KEY, POOLED_KEY, bad_sample_policy
from components.common.parallel import check_pool_fits_cluster
from components.common.progress import progress_bar
from components.common.step import Manifest, StepContext, StepOutput
from components.common.storage import Storage
from components.latents.config import LatentsConfig
from components.latents.load import LABEL_KEY, LATENT_KEY

CODE_VERSION = "1"
SPLITS = ("train", "val")
SHARD_LABEL_KEY = "cls"  # the shard step's label field
CAPTION_KEY = "txt"  # the shard step's caption, copied as it is
RESULT_KEYS = ("split", "index", "file", "count", "sum", "sum_sq", "elements")

log = logging.getLogger(__name__)


def latent_shard_name(split: str, index: int) -> str:
    return f"{split}/latents-{index:05d}.tar"


def key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & 0x7FFFFFFFFFFFFFFF


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def iter_image_chunks(storage: Storage, rel: str, image_key: str, size: int, batch_size: int
                      ) -> Iterator[tuple[list[str], np.ndarray, list[int], list[bytes | None]]]:
    """(keys, images uint8 (B, C, size, size), labels with -1 for none, captions: ``txt`` bytes or
    None) of one shard, ``batch_size`` samples at a time in file order: only one chunk of the shard
    is ever decoded in memory."""
    from components.common.data import ShardDataError, decode_image
    from components.common.resample import resize_uint8
    from components.common.shard_reader import iter_shard_samples, parse_label

    keys, images, labels, shape = [], [], [], None
    texts: list[bytes | None] = []
    for sample in iter_shard_samples(storage, [rel], (image_key, SHARD_LABEL_KEY, CAPTION_KEY)):
        key = sample["__key__"]
        if image_key not in sample:
            raise ShardDataError(f"sample {key!r} in {storage.uri(rel)} has no {image_key!r} field")
        image = decode_image(sample[image_key], key)
        shape = shape or image.shape
        if image.shape != shape:  # the shard step writes one size; anything else is a broken shard
            raise ShardDataError(f"{storage.uri(rel)}: sample {key!r} is {image.shape}, the first one {shape}")
        keys.append(key)
        images.append(image)
        labels.append(parse_label(sample.get(SHARD_LABEL_KEY), key))
        texts.append(sample.get(CAPTION_KEY))
        if len(keys) == batch_size:
            yield keys, resize_uint8(np.stack(images), size), labels, texts
            keys, images, labels, texts = [], [], [], []
    if keys:
        yield keys, resize_uint8(np.stack(images), size), labels, texts


def encode_chunk(model, images: np.ndarray, keys: list[str], cfg: LatentsConfig, scale: float) -> np.ndarray:
    """uint8 images (B, C, H, W) -> scaled latents (B, c, h, w) in ``cfg.dtype``, computed on the
    model's device."""
    import torch

    from components.autoencoder.load import to_model_range

    device = next(model.parameters()).device
    with torch.no_grad():
        posterior = model.encode(to_model_range(images).to(device))
        if cfg.posterior == "mode":
            z = posterior.mode()
        else:  # one draw per image, its noise seeded by the image's key (drawn on the CPU: any device agrees)
            noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(
                key_seed(k))) for k in keys])
            z = posterior.mean + posterior.std * noise.to(device)
        return (z * scale).cpu().numpy().astype(np.dtype(cfg.dtype))


def write_samples(writer, keys: list[str], latents: np.ndarray, labels: list[int],
                  captions: list[bytes | None], embeddings: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    for index, (key, latent, label, caption) in enumerate(zip(keys, latents, labels, captions)):
        sample = {"__key__": key, LATENT_KEY: npy_bytes(latent)}
        if label >= 0:
            sample[LABEL_KEY] = str(int(label)).encode("ascii")
        if caption is not None:
            sample[CAPTION_KEY] = caption
        if embeddings is not None:
            sample[CONTEXT_KEY], sample[POOLED_KEY] = (npy_bytes(part) for part in embeddings[index])
        writer.write(sample)


def embed_chunk(text_encoder, keys: list[str], captions: list[bytes | None], cfg: LatentsConfig,
                where: str) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The chunk's captions through the frozen encoder, one forward: (context, pooled) per sample; None
    without an encoder."""
    if text_encoder is None:
        return None
    from components.common.data import parse_caption
    from components.text.stored import encode_captions

    texts = [parse_caption(caption, f"{where}:{key}") for key, caption in zip(keys, captions)]
    return encode_captions(text_encoder, texts, cfg.dtype)


def add_moments(moments: dict[str, Any], latents: np.ndarray) -> None:
    """Running count, sum and sum of squares (float64) for the step's latent mean and std."""
    as64 = latents.astype(np.float64)
    moments["count"] += len(latents)
    moments["sum"] += float(as64.sum())
    moments["sum_sq"] += float((as64 ** 2).sum())
    moments["elements"] += int(as64.size)


def encode_shard(split: str, index: int, shard_location: str, rel: str, model, meta: "AutoencoderMeta",
                 cfg: LatentsConfig, output: Storage, text_encoder=None) -> dict[str, Any]:
    """One image shard -> one latent shard, in this process, with an autoencoder already loaded
    (``load_autoencoder``: ``model``, ``meta``; and the frozen ``text_encoder`` of ``cfg.text_encoder``,
    when set); returns the shard's counts and latent moments.
    Streams: each chunk of ``cfg.batch_size`` images is written as soon as it is encoded."""
    import webdataset as wds

    from components.common.data import ShardDataError

    name, storage = latent_shard_name(split, index), Storage.from_uri(shard_location)
    chunks = iter_image_chunks(storage, rel, meta.image_format, int(meta.image_size), cfg.batch_size)
    moments: dict[str, Any] = {"count": 0, "sum": 0.0, "sum_sq": 0.0, "elements": 0}
    scratch = Path(tempfile.mkdtemp(prefix="latentflow-latents-"))
    try:
        path = scratch / "shard.tar"  # uploaded once complete: a latent shard appears whole or not at all
        with open(path, "wb") as stream:
            # Fixed mtime (an int: a float adds PAX headers), owner and mode: identical bytes on re-runs.
            writer = wds.TarWriter(stream, encoder=False, mtime=0, user="latentflow", group="latentflow", mode=0o444)
            for keys, images, labels, captions in chunks:
                latents = encode_chunk(model, images, keys, cfg, meta.scale_factor)
                embeddings = embed_chunk(text_encoder, keys, captions, cfg, storage.uri(rel))
                write_samples(writer, keys, latents, labels, captions, embeddings)
                add_moments(moments, latents)
            writer.close()
        if moments["count"] == 0:
            raise ShardDataError(f"{storage.uri(rel)}: the shard has no samples")
        output.upload(name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"split": split, "index": index, "file": name, **moments}


def actor_device() -> str:
    """"cuda" when Ray gave this actor a GPU (it sets CUDA_VISIBLE_DEVICES to that one) and torch
    can use it; else "cpu"."""
    import ray
    import torch

    given_gpu = ray.is_initialized() and bool(ray.get_gpu_ids())
    return "cuda" if given_gpu and torch.cuda.is_available() else "cpu"


class ShardEncoder:
    """``map_batches`` actor: loads the autoencoder once, then encodes one shard per input row
    (``split``, ``index``, ``rel``) and returns that shard's ``encode_shard`` result as a row."""

    def __init__(self, ae_manifest: Manifest, shard_location: str, cfg: LatentsConfig, output: Storage,
                 text_files: dict[str, str] | None = None):
        from components.autoencoder.load import load_autoencoder

        device = actor_device()
        self.model, self.meta = load_autoencoder(ae_manifest, device)
        self.shard_location, self.cfg, self.output = shard_location, cfg, output
        self.text_encoder = None if cfg.text_encoder is None else load_text_encoder(cfg, text_files, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [encode_shard(str(split), int(index), self.shard_location, str(rel), self.model, self.meta,
                                self.cfg, self.output, self.text_encoder)
                   for split, index, rel in zip(batch["split"], batch["index"], batch["rel"])]
        return {key: np.asarray([r[key] for r in results]) for key in RESULT_KEYS}


def load_text_encoder(cfg: LatentsConfig, files: dict[str, str] | None, device: str = "cpu"):
    """The frozen encoder of ``cfg.text_encoder``; its directory checked against the sha256 ``files`` the
    step recorded (a node whose copy differs would store another encoder's embeddings)."""
    from components.text.frozen import FrozenTextEncoder, verify_directory

    spec = cfg.text_encoder
    if files is not None:
        verify_directory(spec.path, files, "latents.text_encoder.path")
    return FrozenTextEncoder(spec.kind, spec.path, spec.max_tokens, "latents.text_encoder.path").to(device)


def plain_result(row: dict[str, Any]) -> dict[str, Any]:
    """A result row from Ray Data (numpy scalars) as ``encode_shard`` returned it."""
    return {"split": str(row["split"]), "index": int(row["index"]), "file": str(row["file"]),
            "count": int(row["count"]), "sum": float(row["sum"]), "sum_sq": float(row["sum_sq"]),
            "elements": int(row["elements"])}


def encode_all(jobs: list[tuple[str, int, str]], shard: Manifest, ae: Manifest, cfg: LatentsConfig,
               ctx: StepContext, text_files: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every shard through a pool of ``ShardEncoder`` actors; results in the order they finish."""
    import ray.data

    res = ctx.resources
    rows = [{"split": split, "index": index, "rel": rel} for split, index, rel in jobs]
    # One block per shard: from_items would otherwise pack several shards into a block, and the
    # actor that gets it would encode them one after another while other actors idle.
    encoded = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardEncoder, batch_size=1, batch_format="numpy",
        # A fixed pool, no larger than the work: each actor loads the model once, so idle ones cost.
        compute=ray.data.ActorPoolStrategy(size=min(res.num_workers, len(rows))),
        num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker,
        fn_constructor_kwargs={"ae_manifest": ae, "shard_location": shard.output_uri, "cfg": cfg,
                               "output": ctx.output, "text_files": text_files})
    total = int(shard.metrics.get("num_train", 0) + shard.metrics.get("num_val", 0)) or None
    results: list[dict[str, Any]] = []
    with closing(progress_bar(total, "images encoded", unit="image", channel=ctx.tracker.progress)) as bar:
        for row in encoded.iter_rows():
            results.append(plain_result(row))
            bar.update(results[-1]["count"])
    return results


def run(cfg: LatentsConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    shard, ae = inputs["shard"], inputs["autoencoder"]
    ae_meta = AutoencoderMeta.read(ae, AE_META)  # checked against the manifest's sha256
    if cfg.posterior == "sample" and ae_meta.kind != "kl":
        raise ValueError(f"latents.posterior: 'sample' draws from a KL autoencoder's posterior, but the "
                         f"autoencoder step trained a {ae_meta.kind!r} one (autoencoder.regularizer), "
                         "whose encoder is deterministic; set latents.posterior: mode")
    jobs = [(split, i, rel) for split in SPLITS for i, rel in enumerate(shard.info[f"{split}_shards"])]
    if not jobs:
        raise ValueError("latents: the shard step wrote no shards")
    check_pool_fits_cluster("latents", ctx.resources)
    text = store_text_null(cfg, shard, ctx) if cfg.text_encoder is not None else None
    results = sorted(encode_all(jobs, shard, ae, cfg, ctx, text and text["files"]), key=lambda r: (SPLITS.index(r["split"]), r["index"]))

    files = {split: [r["file"] for r in results if r["split"] == split] for split in SPLITS}
    counts = {split: sum(r["count"] for r in results if r["split"] == split) for split in SPLITS}
    train = [r for r in results if r["split"] == "train"] or results
    elements = sum(r["elements"] for r in train)
    mean = sum(r["sum"] for r in train) / elements
    std = max(sum(r["sum_sq"] for r in train) / elements - mean ** 2, 0.0) ** 0.5
    info = {"train_shards": files["train"], "val_shards": files["val"], "latent_shape": ae_meta.latent_shape,
            "scale_factor": ae_meta.scale_factor, "classes": shard.info.get("classes"), "counts": counts,
            "posterior": cfg.posterior, "dtype": cfg.dtype,
            # samples per latent shard, which streams plan their epochs with, and the shard step's policy
            # for samples they cannot read
            **{f"{split}_counts": [r["count"] for r in results if r["split"] == split] for split in SPLITS},
            "on_bad_sample": bad_sample_policy(shard)}
    if "captions" in shard.info:  # the latent shards carry the shard step's captions (nothing added otherwise)
        info["captions"] = shard.info["captions"]
    if text is not None:
        info["text_encoder"] = text
    metrics = {"num_train": float(counts["train"]), "num_val": float(counts["val"]),
               "latent_mean": mean, "latent_std": std}
    ctx.tracker.log_metrics(metrics)
    log.info("latents: %d train + %d val latents %s, mean %.3f std %.3f", counts["train"], counts["val"],
             ae_meta.latent_shape, mean, std)
    null = [text["null"]] if text else []
    return StepOutput(files=files["train"] + files["val"] + null, metrics=metrics, info=info)


def store_text_null(cfg: LatentsConfig, shard: Manifest, ctx: StepContext) -> dict[str, Any]:
    """Before the pool starts: refuse shards without captions, record the encoder's files and write the
    null encoding once; returns ``info["text_encoder"]``."""
    from components.common.data import has_captions
    from components.text.frozen import directory_digests
    from components.text.stored import NULL_TEXT_FILE, encoder_record, null_file_bytes

    if not has_captions(shard):
        raise ValueError("latents.text_encoder encodes the captions, but the shards carry none: set shard.captions")
    spec = cfg.text_encoder
    files = directory_digests(spec.path)
    encoder = load_text_encoder(cfg, None)
    ctx.output.write_bytes(NULL_TEXT_FILE, null_file_bytes(encoder, cfg.dtype))
    return encoder_record(spec.kind, spec.path, spec.max_tokens, files, encoder.context_dim)
