"""Latents step: encode every image of the shard step once with the trained autoencoder.

One Ray task per input shard (``num_cpus = resources.cpus_per_worker``, at most ``num_workers`` in
flight) loads the autoencoder, encodes the shard's images in batches of ``batch_size`` (posterior
mode, or one sample per image seeded by its key), multiplies by the scale factor and writes
``train/latents-XXXXX.tar`` (XXXXX: the input shard's index in ``info["train_shards"]``; val
alike) with webdataset's ``TarWriter``: ``<key>.latent.npy`` ((c, h, w), ``dtype``) and
``<key>.cls`` when labelled. Bytes are deterministic (fixed mtime/owner/mode, sample order of the
input shard), so re-running writes identical shards. Read them with ``components.latents.data``.

A VQ autoencoder's latents are its encoder's pre-quantisation outputs (LDM): the codebook is
applied when they are decoded. Its encoder is deterministic, so ``posterior: sample`` is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from components.autoencoder.load import AE_META
from components.common.parallel import bounded_imap
from components.common.progress import progress_bar
from components.common.step import Manifest, StepContext, StepOutput
from components.common.storage import Storage
from components.latents.config import LatentsConfig
from components.latents.data import LABEL_KEY, LATENT_KEY

CODE_VERSION = "1"
SPLITS = ("train", "val")

log = logging.getLogger(__name__)


def latent_shard_name(split: str, index: int) -> str:
    return f"{split}/latents-{index:05d}.tar"


def key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & 0x7FFFFFFFFFFFFFFF


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_shard(split: str, index: int, shard_location: str, rel: str, ae_manifest: Manifest,
                 cfg: LatentsConfig, output: Storage) -> dict[str, Any]:
    """One Ray task: one image shard -> one latent shard; returns its counts and latent moments."""
    import torch
    import webdataset as wds

    from components.autoencoder.load import load_autoencoder, to_model_range
    from components.common.shard_reader import read_image_shards

    model, meta = load_autoencoder(ae_manifest)
    images, labels, keys = read_image_shards(Storage.from_uri(shard_location), [rel], meta["image_format"],
                                             size=int(meta["image_size"]))
    scale, dtype = meta["scale_factor"], np.dtype(cfg.dtype)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), cfg.batch_size):
            posterior = model.encode(to_model_range(images[start:start + cfg.batch_size]))
            if cfg.posterior == "mode":
                z = posterior.mode()
            else:  # one draw per image, its noise seeded by the image's key
                noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(
                    key_seed(k))) for k in keys[start:start + cfg.batch_size]])
                z = posterior.mean + posterior.std * noise
            chunks.append((z * scale).numpy().astype(dtype))
    latents = np.concatenate(chunks)
    name = latent_shard_name(split, index)
    scratch = Path(tempfile.mkdtemp(prefix="latentflow-latents-"))
    try:
        path = scratch / "shard.tar"
        with open(path, "wb") as stream:
            # Fixed mtime (an int: a float adds PAX headers), owner and mode: identical bytes on re-runs.
            writer = wds.TarWriter(stream, encoder=False, mtime=0, user="latentflow", group="latentflow", mode=0o444)
            for key, latent, label in zip(keys, latents, labels):
                sample = {"__key__": key, LATENT_KEY: npy_bytes(latent)}
                if label >= 0:
                    sample[LABEL_KEY] = str(int(label)).encode("ascii")
                writer.write(sample)
            writer.close()
        output.upload(name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    as64 = latents.astype(np.float64)
    return {"split": split, "index": index, "file": name, "count": len(keys),
            "sum": float(as64.sum()), "sum_sq": float((as64 ** 2).sum()), "elements": int(as64.size)}


def run(cfg: LatentsConfig, inputs: dict[str, Manifest], ctx: StepContext) -> StepOutput:
    shard, ae = inputs["shard"], inputs["autoencoder"]
    ae_meta = json.loads(ae.storage().read_text(AE_META))
    if cfg.posterior == "sample" and ae_meta.get("regularizer", "kl") != "kl":
        raise ValueError(f"latents.posterior: 'sample' draws from a KL autoencoder's posterior, but the "
                         f"autoencoder step trained a {ae_meta['regularizer']!r} one (autoencoder.regularizer), "
                         "whose encoder is deterministic; set latents.posterior: mode")
    jobs = [(split, i, rel) for split in SPLITS for i, rel in enumerate(shard.info[f"{split}_shards"])]
    if not jobs:
        raise ValueError("latents: the shard step wrote no shards")
    total = int(shard.metrics.get("num_train", 0) + shard.metrics.get("num_val", 0)) or None
    results: list[dict[str, Any]] = []
    with closing(progress_bar(total, "latents: images encoded", unit="image")) as bar:
        for result in bounded_imap(encode_shard, ((split, index, shard.location, rel, ae, cfg, ctx.output)
                                                  for split, index, rel in jobs),
                                   ctx.resources.num_workers, ctx.resources.cpus_per_worker):
            results.append(result)
            bar.update(result["count"])
    results.sort(key=lambda r: (SPLITS.index(r["split"]), r["index"]))

    files = {split: [r["file"] for r in results if r["split"] == split] for split in SPLITS}
    counts = {split: sum(r["count"] for r in results if r["split"] == split) for split in SPLITS}
    train = [r for r in results if r["split"] == "train"] or results
    elements = sum(r["elements"] for r in train)
    mean = sum(r["sum"] for r in train) / elements
    std = max(sum(r["sum_sq"] for r in train) / elements - mean ** 2, 0.0) ** 0.5
    info = {"train_shards": files["train"], "val_shards": files["val"], "latent_shape": ae_meta["latent_shape"],
            "scale_factor": ae_meta["scale_factor"], "classes": shard.info.get("classes"), "counts": counts,
            "posterior": cfg.posterior, "dtype": cfg.dtype}
    metrics = {"num_train": float(counts["train"]), "num_val": float(counts["val"]),
               "latent_mean": mean, "latent_std": std}
    ctx.tracker.log_metrics(metrics)
    log.info("latents: %d train + %d val latents %s, mean %.3f std %.3f", counts["train"], counts["val"],
             ae_meta["latent_shape"], mean, std)
    return StepOutput(files=files["train"] + files["val"], metrics=metrics, info=info)
