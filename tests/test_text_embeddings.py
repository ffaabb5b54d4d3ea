"""A frozen encoder's caption embeddings computed once by the latents step (issue 17): the real latents
step on the Ray cluster fixture stores them beside the latents, they equal the encoder's, the DiT task
trains from them without loading the encoder (its loss the on-the-fly one), and another encoder's
embeddings are refused by name. A tiny local CLIP built here (nothing downloaded), an untrained tiny
autoencoder, the shard step's captioned digits."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from components.autoencoder.load import AE_META, AE_WEIGHTS
from components.common.step import FileRecord, Manifest
from components.common.storage import Storage
from components.dit.config import DitConfig
from components.dit.task import LatentDitTask
from components.dit.text_model import text_dit_arguments
from components.dit.text_setup import prepare_text
from components.dit.train import build_step_dit
from components.latents.config import LatentsConfig
from components.latents.run import encode_shard, run
from components.text.config import TextEncoderConfig
from components.text.frozen import FrozenTextEncoder, directory_digests
from components.text.model import NULL_CAPTION
from components.text.stored import NULL_TEXT_FILE, read_null
from test_autoencoder import make_ctx, manifest_from
from test_caption_stream import SAMPLES, members, shard_step
from test_text_encoder import save_tiny_model
import metas

MAX_TOKENS = 8
LATENT = [4, 8, 8]  # ae-mnist on the 32 px digits: f = 4
_CACHE: dict[str, object] = {}


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def untrained_autoencoder(root) -> Manifest:
    """An autoencoder step's output for ae-mnist with its initial weights: enough to encode digits."""
    from safetensors.torch import save_file

    from components.autoencoder.model import build_autoencoder

    torch.manual_seed(0)
    model = build_autoencoder("ae-mnist")
    storage = Storage.from_uri(str(root))
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / AE_WEIGHTS))
    meta = metas.ae_meta(preset="ae-mnist", model=model.arguments, regularizer="kl", latent_shape=list(LATENT),
                         downsample_factor=4, latent_channels=LATENT[0],
                         scale_factor=0.5, image_format="png", image_size=32, channels=1, classes=None)
    storage.write_text(AE_META, json.dumps(meta.to_json()))
    files = [FileRecord(rel, storage.sha256(rel), storage.size(rel)) for rel in (AE_WEIGHTS, AE_META)]
    return Manifest(step="autoencoder", cache_key="k", code_version="1", location=storage.uri(), config={},
                    upstream={}, files=files, info={})


@pytest.fixture(scope="module")
def stored(ray_cluster, tmp_path_factory):
    """(shard manifest, autoencoder manifest, latents manifest with embeddings, the CLIP's directory)."""
    if "stored" not in _CACHE:
        root = tmp_path_factory.mktemp("text-embeddings")
        save_tiny_model(root / "clip", "frozen_clip")
        shards, ae = shard_step(root / "shard", "attributes"), untrained_autoencoder(root / "ae")
        cfg = LatentsConfig(batch_size=10, text_encoder={"kind": "frozen_clip", "path": str(root / "clip"),
                                                         "max_tokens": MAX_TOKENS})
        ctx = make_ctx(root, "latents", workers=2)
        latents = manifest_from(run(cfg, {"shard": shards, "autoencoder": ae}, ctx), ctx)
        _CACHE["stored"] = (shards, ae, latents, root / "clip")
    return _CACHE["stored"]


def clip(directory) -> FrozenTextEncoder:
    return FrozenTextEncoder("frozen_clip", directory, MAX_TOKENS)


def test_latent_shards_carry_the_encoders_embeddings(stored):
    shards, _, latents, directory = stored
    assert latents.verify() == []
    record = latents.info["text_encoder"]
    assert record["kind"] == "frozen_clip" and record["path"] == str(directory) and record["max_tokens"] == MAX_TOKENS
    assert record["files"] == directory_digests(directory) and record["context_dim"] == 16
    encoder = clip(directory)
    samples = members(latents.storage(), latents.info["train_shards"][0])
    assert len(samples) == SAMPLES
    for sample in samples:  # each caption alone through the encoder: padding in the step's chunks changed nothing
        tokens, mask, pooled = encoder([sample["txt"].decode()])
        context = npy(sample["context.npy"])
        assert context.dtype == np.float32 and context.shape == (int(mask.sum()), 16)
        torch.testing.assert_close(torch.from_numpy(context), tokens[0, mask[0]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(npy(sample["pooled.npy"])), pooled[0], rtol=1e-5, atol=1e-5)
    null_context, null_pooled = read_null(latents)
    null = encoder.null()
    assert NULL_TEXT_FILE in [f.path for f in latents.files] and null_context.shape == (2, 16)  # bos, eos
    torch.testing.assert_close(null_context, null.tokens[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(null_pooled, null.pooled[0], rtol=1e-6, atol=1e-6)


class CountingEncoder(FrozenTextEncoder):
    """The real frozen CLIP, recording how many captions each forward took."""

    calls: list[int]

    def forward(self, captions):
        self.calls.append(len(captions))
        return super().forward(captions)


@pytest.mark.usefixtures("one_thread")  # as the step's actors: BLAS rounding depends on the thread count
def test_in_process_shard_is_the_pools_and_the_encoder_sees_one_chunk_at_a_time(stored, tmp_path):
    """Memory per actor stays one chunk: the encoder takes ``batch_size`` captions a forward. The latent
    bytes are those written without text; in float16 the embeddings are the float32 ones, rounded."""
    from components.autoencoder.load import load_autoencoder

    shards, ae, latents, directory = stored
    model, meta = load_autoencoder(ae)
    spec = {"kind": "frozen_clip", "path": str(directory), "max_tokens": MAX_TOKENS}
    encoder = CountingEncoder("frozen_clip", directory, MAX_TOKENS)
    encoder.calls = []
    rel = shards.info["train_shards"][0]
    written = {}
    for name, cfg, text in (("fp16", LatentsConfig(batch_size=10, dtype="float16", text_encoder=spec), encoder),
                            ("plain", LatentsConfig(batch_size=10), None)):
        out = Storage.from_uri(str(tmp_path / name))
        result = encode_shard("train", 0, shards.output_uri, rel, model, meta, cfg, out, text)
        written[name] = members(out, result["file"])
    assert encoder.calls == [10, 10, SAMPLES - 20]
    pool = members(latents.storage(), latents.info["train_shards"][0])
    assert [s["latent.npy"] for s in written["plain"]] == [s["latent.npy"] for s in pool]
    assert all("context.npy" not in s for s in written["plain"])
    for half, full in zip(written["fp16"], pool):
        context = npy(half["context.npy"])
        assert context.dtype == np.float16
        np.testing.assert_allclose(context.astype(np.float32), npy(full["context.npy"]), rtol=2e-3, atol=2e-3)


def text_setup(latents: Manifest, directory, **text):
    cfg = DitConfig(preset="DiT-Micro/2", conditioning="text",
                    train={"max_steps": 2, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.5},
                    text={"kind": "frozen_clip", "path": str(directory), "max_tokens": MAX_TOKENS,
                          "caption_dropout": 0.5, **text})
    kwargs = build_step_dit(cfg, LATENT, None, text_dit_arguments(clip(directory))).arguments
    meta = {"schedule": cfg.schedule, "num_timesteps": cfg.num_timesteps, "prediction": cfg.prediction,
            "learn_sigma": False, "num_classes": 1, "null_label": None, "latent_shape": LATENT, "model": kwargs,
            "text": cfg.text.model_dump(mode="json"), "conditioning": "text"}
    return cfg, LatentDitTask(cfg, kwargs, meta, latents=latents)


def first_batch(task: LatentDitTask) -> dict:
    source = task.batch_source(0, 1, 8)
    try:
        return next(iter(source.epoch(0, 0, 0))).tensors
    finally:
        source.close()


def test_the_dit_trains_from_stored_embeddings_as_from_the_encoder(stored, tmp_path):
    _, _, latents, directory = stored
    cfg, task = text_setup(latents, directory, precompute=True)
    assert prepare_text(cfg, latents).encoder_files == latents.info["text_encoder"]["files"]  # the same encoder
    assert task.stored_text
    batch = first_batch(task)
    encoder = clip(directory)
    tokens, mask, pooled = encoder(batch["caption"])
    assert batch["context"].shape == tokens.shape and torch.equal(batch["context_mask"], mask)  # padded, masked
    torch.testing.assert_close(batch["context"][mask], tokens[mask], rtol=1e-5, atol=1e-5)
    assert not batch["context"][~mask].any()
    drop = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1])
    given = task.text_conditioning(batch, drop)
    captions = [NULL_CAPTION if d else c for c, d in zip(batch["caption"], drop.tolist())]
    expected = encoder(captions)  # what the on-the-fly path encodes for the same rows
    assert torch.equal(given["context_mask"], expected.mask)
    torch.testing.assert_close(given["context"][expected.mask], expected.tokens[expected.mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(given["pooled"], expected.pooled, rtol=1e-5, atol=1e-5)

    moved = tmp_path / "elsewhere"
    shutil.move(directory, moved)  # the training model needs no encoder: it is not loaded
    try:
        trained = task.build_model()
    finally:
        shutil.move(moved, directory)
    assert trained._frozen == [] and "context_mask" in batch
    on_the_fly = task.bare_model(with_encoder=True)
    on_the_fly.load_state_dict(trained.state_dict())
    captions_only = {k: v for k, v in batch.items() if k not in ("context", "context_mask", "pooled")}
    losses = [task.loss(model, data, 0, torch.Generator().manual_seed(5))[0]
              for model, data in ((trained, batch), (on_the_fly, captions_only))]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="without its frozen text encoder"):
        trained.encode(["a seven"])


def test_the_training_loop_runs_from_stored_embeddings_without_the_encoder(stored, tmp_path):
    """The trainer's whole path (the task as it travels to workers, its stream, model, loss and export)
    with the encoder's directory gone: nothing in training loads it."""
    import pickle

    from components.common.train_loop import LocalSession, train_loop

    _, _, latents, directory = stored
    _, task = text_setup(latents, directory, precompute=True)
    task = pickle.loads(pickle.dumps(task))
    moved = tmp_path / "elsewhere"
    shutil.move(directory, moved)
    try:
        final = train_loop(task, task.cfg.train, LocalSession(tmp_path / "ckpt"), None)
    finally:
        shutil.move(moved, directory)
    assert final["step"] == 2 and np.isfinite(final["loss"])
    assert (sorted((tmp_path / "ckpt").iterdir())[-1] / "export" / "dit.safetensors").is_file()


def test_another_encoders_embeddings_are_refused_naming_both(stored, tmp_path):
    _, _, latents, directory = stored
    cfg, _ = text_setup(latents, directory, max_tokens=6)
    with pytest.raises(ValueError, match=rf"frozen_clip encoder at '{directory}' \(max_tokens 8\), not by "
                                         rf"dit.text's frozen_clip encoder at '{directory}' \(max_tokens 6\)"):
        prepare_text(cfg, latents)
    save_tiny_model(tmp_path / "t5", "frozen_t5")
    cfg, _ = text_setup(latents, directory)
    cfg.text = TextEncoderConfig(kind="frozen_t5", path=str(tmp_path / "t5"), max_tokens=MAX_TOKENS)
    with pytest.raises(ValueError, match=rf"'{directory}'.*dit.text's frozen_t5 encoder at '{tmp_path / 't5'}'.*"
                                         r"their kind, files differ"):
        prepare_text(cfg, latents)


def test_pipeline_config_fills_the_latents_encoder_from_dit_text(tmp_path):
    from components.common.config import ConfigError
    from pipelines.config import load_pipeline_config

    frozen = ["dit.text.kind=frozen_clip", f"dit.text.path={tmp_path}", "dit.text.max_tokens=8"]
    plain = load_pipeline_config("configs/pipeline/smoke-text.yaml", frozen)
    assert plain.latents.text_encoder is None and "precompute" not in plain.dit.text.cache_relevant()
    assert "text_encoder" not in plain.latents.cache_relevant()  # existing cache keys stay
    filled = load_pipeline_config("configs/pipeline/smoke-text.yaml", [*frozen, "dit.text.precompute=true"])
    assert filled.latents.text_encoder.model_dump() == {"kind": "frozen_clip", "path": str(tmp_path), "max_tokens": 8}
    with pytest.raises(ConfigError, match="is not dit.text's frozen encoder"):
        load_pipeline_config("configs/pipeline/smoke-text.yaml", [*frozen, "dit.text.precompute=true",
                             "latents.text_encoder={kind: frozen_t5, path: /x, max_tokens: 8}"])
    with pytest.raises(ConfigError, match="precompute stores a frozen encoder's embeddings"):
        load_pipeline_config("configs/pipeline/smoke-text.yaml", ["dit.text.precompute=true"])
