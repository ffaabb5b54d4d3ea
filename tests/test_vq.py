"""The VQ-regularised autoencoder (``autoencoder.regularizer: vq``): the quantiser's math against hand
computations, its buffers under data parallelism (two gloo processes), the model's round trip
(the autoencoder contract of test_models), and the autoencoder step trained in one process through
the shared train loop (``fit`` replaced by ``train_loop`` + ``LocalSession``: no Ray), up to the
latents step's encoder. CPU, well under a minute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from components.autoencoder.config import AutoencoderConfig, VQConfig
from components.autoencoder.load import AE_META, AE_WEIGHTS, decode_scaled, encode_scaled, load_autoencoder
from components.autoencoder.model import AutoencoderVQ, build_autoencoder
from components.autoencoder.quantize import VectorQuantizer, code_statistics
from components.autoencoder.train import RECONSTRUCTIONS, build_step_autoencoder, reconstruction_metrics
from components.common.train_types import TrainConfig
from test_autoencoder import INFO, TINY, digits, make_ctx, manifest_from, sqlite_tracker
from test_models import AutoencoderContract

VQ_TINY = dict(**TINY, regularizer="vq", vq=VQConfig(codebook_size=64))


def quantizer_with(codebook, cluster_size=None, **kwargs) -> VectorQuantizer:
    codebook = torch.as_tensor(codebook, dtype=torch.float32)
    q = VectorQuantizer(len(codebook), codebook.shape[1], **kwargs)
    q.codebook.copy_(codebook)
    q.cluster_size.copy_(torch.ones(len(codebook)) if cluster_size is None else torch.as_tensor(cluster_size))
    q.embed_sum.copy_(codebook * q.cluster_size[:, None])
    return q


def as_latent(vectors) -> torch.Tensor:
    """Rows (M, D) -> a (1, D, 1, M) latent whose positions are those rows, in order."""
    return torch.as_tensor(vectors, dtype=torch.float32).t()[None, :, None, :].contiguous()


def buffers(q: VectorQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.named_buffers()}


# ---------------------------------------------------------------- the quantiser


def test_straight_through_gradient_reaches_the_encoder():
    q = quantizer_with([[0.0, 0.0], [10.0, 0.0]], beta=0.25).eval()
    z = as_latent([[1.0, 2.0], [9.0, -1.0], [4.0, 4.0]]).requires_grad_()
    out, loss, _ = q(z)
    codes = as_latent([[0.0, 0.0], [10.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(out, codes)  # the values are the codes...
    weights = torch.randn_like(z)
    (grad,) = torch.autograd.grad((out * weights).sum(), z)
    torch.testing.assert_close(grad, weights)  # ...the gradient is the identity
    (commit_grad,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(loss, 0.25 * (z - codes).pow(2).mean())
    torch.testing.assert_close(commit_grad, 0.25 * 2 * (z - codes) / z.numel())
    assert not list(q.parameters())  # the codebook is a buffer: no gradient, no optimizer

    # Through the whole model: the reconstruction loss reaches every encoder weight.
    torch.manual_seed(0)
    model = build_autoencoder("ae-tiny", "vq", in_channels=1, codebook_size=16).eval()
    x = digits(2).float() / 127.5 - 1
    quantized, commit, _ = model.quantize(model.encode(x).mode())
    rec = F.l1_loss(model.decode_quantized(quantized), x)
    encoder = list(model.encoder.parameters()) + list(model.quant_conv.parameters())
    grads = torch.autograd.grad(rec, encoder, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(commit, encoder))


def test_ema_update_moves_codes_toward_the_mean_of_their_vectors():
    q = quantizer_with([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], ema_decay=0.5, dead_code_threshold=0.0,
                       epsilon=1e-5)
    z = as_latent([[1.0, 1.0], [-1.0, 1.0], [9.0, 0.0], [11.0, 2.0]])  # codes 0, 0, 1, 1; none for 2
    before = buffers(q)

    q.eval()
    out_eval, _, _ = q(z)
    assert all(torch.equal(before[k], v) for k, v in q.named_buffers())  # eval: nothing moves

    q.train()
    out, _, stats = q(z)
    torch.testing.assert_close(out, out_eval)  # this batch is quantised with the codebook before the update
    assert stats.indices.flatten().tolist() == [0, 0, 1, 1]
    # By hand, γ = 0.5: n = (2, 2, 0), sums s0 = (0, 2), s1 = (20, 2);
    # N = 0.5·1 + 0.5·n = (1.5, 1.5, 0.5); m = 0.5·e + 0.5·s = ((0, 1), (15, 1), (0, 5)).
    size = torch.tensor([1.5, 1.5, 0.5])
    sums = torch.tensor([[0.0, 1.0], [15.0, 1.0], [0.0, 5.0]])
    torch.testing.assert_close(q.cluster_size, size)
    torch.testing.assert_close(q.embed_sum, sums)
    smoothed = (size + 1e-5) / (3.5 + 3 * 1e-5) * 3.5  # Laplace smoothing, Σ N = 3.5
    torch.testing.assert_close(q.codebook, sums / smoothed[:, None])
    torch.testing.assert_close(q.codebook, torch.tensor([[0.0, 2 / 3], [10.0, 2 / 3], [0.0, 10.0]]), atol=1e-3,
                               rtol=0)
    means = torch.tensor([[0.0, 1.0], [10.0, 1.0]])  # of the vectors assigned to codes 0 and 1
    assert ((q.codebook[:2] - means).norm(dim=1) < (before["codebook"][:2] - means).norm(dim=1)).all()

    # A batch with a non-finite value updates nothing (the trainer skips that step as well).
    after = buffers(q)
    q(as_latent([[float("nan"), 0.0], [1.0, 1.0]]))
    assert all(torch.equal(after[k], v) for k, v in q.named_buffers())


def test_dead_codes_are_reseeded_from_encoder_outputs():
    far = [[100.0, 100.0]] * 3
    q = quantizer_with([[0.0, 0.0]] + far, ema_decay=0.9, dead_code_threshold=1.0)
    flat = torch.randn(32, 2)  # all nearest to code 0; codes 1-3 get nothing: N = 0.9 < 1, dead
    q.train()(as_latent(flat), torch.Generator().manual_seed(0))
    rows = {tuple(r) for r in flat.tolist()}
    new = [tuple(r) for r in q.codebook[1:].tolist()]
    assert set(new) <= rows and len(set(new)) == 3  # three distinct encoder outputs
    torch.testing.assert_close(q.cluster_size[1:], torch.ones(3))  # reset to the threshold
    torch.testing.assert_close(q.embed_sum[1:], q.codebook[1:])  # m = threshold · e
    assert q.cluster_size[0] > 1 and tuple(q.codebook[0].tolist()) not in rows  # the live code is kept

    same = quantizer_with([[0.0, 0.0]] + far, ema_decay=0.9, dead_code_threshold=1.0)
    same.train()(as_latent(flat), torch.Generator().manual_seed(0))
    torch.testing.assert_close(same.codebook, q.codebook)  # the step's generator decides, reproducibly

    never = quantizer_with([[0.0, 0.0]] + far, ema_decay=0.9, dead_code_threshold=0.0)
    never.train()(as_latent(flat))
    torch.testing.assert_close(never.codebook[1:], torch.full((3, 2), 100.0), atol=1e-3, rtol=0)  # never dead


def test_usage_and_perplexity_of_a_constructed_assignment():
    usage, perplexity = code_statistics(torch.tensor([4.0, 4.0, 0.0, 0.0]))
    assert usage.item() == 0.5 and perplexity.item() == pytest.approx(2.0)
    usage, perplexity = code_statistics(torch.tensor([2.0, 1.0, 1.0, 0.0]))  # p = (1/2, 1/4, 1/4)
    assert usage.item() == 0.75 and perplexity.item() == pytest.approx(2 ** 1.5)
    assert code_statistics(torch.full((8,), 3.0))[1].item() == pytest.approx(8.0)  # uniform: K

    q = quantizer_with([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]).eval()
    z = as_latent([[0.1, 0.0], [9.0, 1.0], [0.2, 0.3], [10.0, 9.5], [0.0, 0.1], [0.0, -0.5]])
    _, _, stats = q(z)
    assert stats.indices.flatten().tolist() == [0, 1, 0, 3, 0, 0]
    assert stats.counts.tolist() == [4.0, 1.0, 0.0, 1.0]
    assert stats.usage.item() == 0.75
    p = np.array([4, 1, 1]) / 6
    assert stats.perplexity.item() == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)


def _data_parallel_worker(rank: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    torch.manual_seed(0)  # every rank builds the same codebook, as the trainer's seeded build does
    q = VectorQuantizer(16, 3, ema_decay=0.8, dead_code_threshold=1.0).train()
    batch = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(100 + rank))  # differs per rank
    _, _, stats = q(batch, torch.Generator().manual_seed(rank))  # so does each rank's generator
    torch.save({**buffers(q), "counts": stats.counts}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_buffers_agree_across_data_parallel_workers(tmp_path):
    """Two gloo ranks with different batches: the same buffers on both, equal to one process's
    update on both batches together; dead codes re-seeded from rank 0's batch on both."""
    import torch.multiprocessing as mp

    mp.spawn(_data_parallel_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in r0:
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0)

    torch.manual_seed(0)
    alone = VectorQuantizer(16, 3, ema_decay=0.8, dead_code_threshold=0.0).train()  # reseeding compared below
    both = torch.cat([torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(100 + r)) for r in (0, 1)])
    _, _, stats = alone(both)
    torch.testing.assert_close(r0["counts"], stats.counts)
    torch.testing.assert_close(r0["cluster_size"].clamp_min(1.0), alone.cluster_size.clamp_min(1.0))
    live = alone.cluster_size >= 1.0  # codes not re-seeded: the same EMA sums as one process
    assert live.any()
    torch.testing.assert_close(r0["embed_sum"][live], alone.embed_sum[live])
    torch.testing.assert_close(r0["codebook"][live], alone.codebook[live])
    rank0_rows = {tuple(r) for r in both[:2].permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    assert all(tuple(r) in rank0_rows for r in r0["codebook"][~live].tolist())


def test_buffers_stay_float32_under_a_16_bit_model():
    model = build_autoencoder("ae-tiny", "vq", codebook_size=8).bfloat16()
    assert model.decoder.conv_out.weight.dtype == torch.bfloat16
    assert {b.dtype for b in model.quantizer.buffers()} == {torch.float32}
    out, loss, _ = model.quantizer(torch.randn(1, 4, 2, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32


# ---------------------------------------------------------------- the model


class TestAutoencoderVQTiny(AutoencoderContract):
    downsample_factor, latent_channels = 2, 4

    def build(self):
        return build_autoencoder("ae-tiny", "vq", codebook_size=32)


def test_decode_snaps_latents_to_the_codebook():
    torch.manual_seed(0)
    model = build_autoencoder("ae-tiny", "vq", in_channels=1, codebook_size=32).eval()
    x = digits(4).float() / 127.5 - 1
    z = model.encode(x).mode()  # (4, 4, 16, 16): continuous, what the latents step stores
    assert z.shape == (4, 4, 16, 16) and torch.equal(model.encode(x).sample(), z)
    _, _, stats = model.quantize(z)
    codes = model.quantizer.lookup(stats.indices)  # (4, 4, 16, 16)
    assert not torch.equal(codes, z)
    torch.testing.assert_close(model.decode(z), model.decode_quantized(codes))  # the quantiser is the decoder's
    torch.testing.assert_close(model.decode(z), model.decode(codes))  # codes are fixed points
    assert model.decode(z).shape == x.shape


def test_config_switches_with_one_key_and_keeps_kl_cache_keys():
    from components.common.config import apply_overrides, read_yaml

    root = Path(__file__).resolve().parents[1]
    mnist = read_yaml(root / "configs/pipeline/mnist.yaml")
    kl = AutoencoderConfig.model_validate(mnist["autoencoder"])
    vq = AutoencoderConfig.model_validate(apply_overrides(mnist, ["autoencoder.regularizer=vq"])["autoencoder"])
    assert kl.regularizer == "kl" and vq.regularizer == "vq" and 256 <= vq.vq.codebook_size <= 512
    assert AutoencoderConfig.model_validate(read_yaml(root / "configs/pipeline/smoke.yaml")["autoencoder"]
                                            ).regularizer == "kl"
    # kl keys never see the vq section (so they are what they were before it existed); vq keys
    # never see kl_weight
    assert "vq" not in kl.cache_relevant() and "kl_weight" not in vq.cache_relevant()
    assert kl.model_copy(update={"vq": VQConfig(codebook_size=8)}).cache_relevant() == kl.cache_relevant()
    assert vq.model_copy(update={"kl_weight": 1.0}).cache_relevant() == vq.cache_relevant()
    assert vq.model_copy(update={"vq": VQConfig(beta=1.0)}).cache_relevant() != vq.cache_relevant()
    kwargs = build_step_autoencoder(AutoencoderConfig(**VQ_TINY), INFO).arguments
    assert kwargs["codebook_size"] == 64 and kwargs["beta"] == 0.25
    assert "codebook_size" not in build_step_autoencoder(AutoencoderConfig(**TINY), INFO).arguments


# ---------------------------------------------------------------- the step, in one process


def write_digit_shards(root: Path, n_train: int = 192, n_val: int = 32):
    """A shard step's output for the first bundled digits, written without Ray."""
    import webdataset as wds
    from PIL import Image

    from components.common.step import FileRecord, Manifest
    from components.common.storage import Storage
    from components.shard.images import encode

    images = digits(n_train + n_val).numpy()
    storage = Storage.from_uri(str(root))
    files, splits = [], {"train": [], "val": []}
    for split, rows in (("train", range(n_train)), ("val", range(n_train, n_train + n_val))):
        rel = f"{split}/shard-00000-000.tar"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(path)) as writer:
            for row in rows:
                writer.write({"__key__": f"digit-{row:05d}", "png": encode(Image.fromarray(images[row, 0]), "png"),
                              "cls": b"0"})
        splits[split].append(rel)
        files.append(FileRecord(rel, storage.sha256(rel), storage.size(rel)))
    info = {"channels": 1, "image_size": 32, "image_format": "png", "train_shards": splits["train"],
            "val_shards": splits["val"], "classes": [str(d) for d in range(10)]}
    return Manifest("shard", "k", "1", storage.uri(), {}, {}, files, metrics={}, info=info)


def fit_in_process(checkpoint_root: Path):
    """``trainer.fit`` without Ray: the same train loop, one rank, checkpoints under ``checkpoint_root``."""
    from components.common.train_loop import LocalSession, train_loop
    from components.common.train_types import FitResult

    def fit(task, cfg, ctx, datasets=None, name="train"):
        metrics = train_loop(task, cfg, LocalSession(checkpoint_root), ctx.tracker)
        final = sorted(checkpoint_root.glob("checkpoint_*"))[-1]
        return FitResult(metrics=metrics, export_dir=final / "export", checkpoint_uri=str(final))

    return fit


@pytest.fixture(scope="module")
def vq_step(tmp_path_factory):
    import components.autoencoder.train as train

    root = tmp_path_factory.mktemp("vq")
    shard = write_digit_shards(root / "shard")
    tracker = sqlite_tracker(root)
    ctx = make_ctx(root, "autoencoder", tracker, workers=1)
    cfg = AutoencoderConfig(**VQ_TINY, scale_estimate_samples=64, val_samples=32,
                            train=TrainConfig(max_steps=24, batch_size=16, lr=3e-3, log_every=4, checkpoint_every=12,
                                              ema_decay=0.8))
    saved, train.fit = train.fit, fit_in_process(root / "checkpoints")
    try:
        out = train.run(cfg, {"shard": shard}, ctx)
    finally:
        train.fit = saved
    return manifest_from(out, ctx), tracker, shard, sorted((root / "checkpoints").glob("checkpoint_*"))


def test_step_trains_reports_codebook_statistics_and_exports_the_codebook(vq_step):
    manifest, tracker, shard, checkpoints = vq_step
    history = {}
    for key in ("rec_loss", "vq_loss", "vq_batch_usage", "vq_batch_perplexity"):
        points = sorted(tracker.client.get_metric_history(tracker.run_id, key), key=lambda m: m.step)
        history[key] = [m.value for m in points]
    rec = history["rec_loss"]
    assert len(rec) == 6 and rec[-1] < 0.7 * rec[0], rec  # the loss falls
    assert all(0 < u <= 1 for u in history["vq_batch_usage"])
    assert all(1 <= p <= 64 for p in history["vq_batch_perplexity"]) and all(v > 0 for v in history["vq_loss"])
    assert "kl" not in tracker.client.get_run(tracker.run_id).data.metrics

    # Validation statistics: in the manifest and the step's MLflow run, beside PSNR and the grid.
    metrics = manifest.metrics
    assert 0 < metrics["val_codebook_usage"] <= 1 and 1 <= metrics["val_codebook_perplexity"] <= 64
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    assert {"val_psnr", "val_codebook_usage", "val_codebook_perplexity"} <= set(logged)
    assert {RECONSTRUCTIONS, AE_META} <= {a.path for a in tracker.client.list_artifacts(tracker.run_id)}

    # The codebook travels in the exported weights and every checkpoint (the EMA copy holds the
    # live buffers), and it moved away from its initial values.
    model, meta = load_autoencoder(manifest)
    assert isinstance(model, AutoencoderVQ) and meta.regularizer == "vq"
    assert meta.model["codebook_size"] == 64 and meta.scale_from == "pre_quantization"
    exported = load_file(str(manifest.storage().path(AE_WEIGHTS)))
    assert {"quantizer.codebook", "quantizer.cluster_size", "quantizer.embed_sum"} <= set(exported)
    ema = load_file(str(checkpoints[-1] / "ema.safetensors"))
    torch.testing.assert_close(ema["ae.quantizer.codebook"], exported["quantizer.codebook"])
    (module_states,) = (checkpoints[-1] / "deepspeed").glob("*model_states.pt")  # DeepSpeed's own file
    deepspeed_module = torch.load(module_states, weights_only=False, map_location="cpu")["module"]
    torch.testing.assert_close(deepspeed_module["ae.quantizer.codebook"], exported["quantizer.codebook"])
    first = load_file(str(checkpoints[0] / "ema.safetensors"))["ae.quantizer.codebook"]
    assert len(checkpoints) == 2 and not torch.equal(first, exported["quantizer.codebook"])
    torch.manual_seed(0)
    assert not torch.equal(build_autoencoder("ae-tiny", "vq", in_channels=1, codebook_size=64
                                             ).quantizer.codebook, exported["quantizer.codebook"])

    # Reconstruction through the codebook, as the step measured it; scaled latents round-trip.
    from components.common.shard_reader import read_image_shards

    val, _, _ = read_image_shards(shard.storage(), shard.info["val_shards"], "png")
    again, _ = reconstruction_metrics(model, val)
    assert again["val_psnr"] == pytest.approx(metrics["val_psnr"], abs=1e-4)
    latents = encode_scaled(model, meta, val)
    assert latents.shape == (len(val), 4, 16, 16) and 0.5 < float(latents.std()) < 2.0
    decoded = decode_scaled(model, meta, latents)
    assert decoded.shape == (len(val), 1, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1


def test_latents_step_encodes_pre_quantisation_latents_and_refuses_sampling(vq_step, tmp_path):
    from components.common.storage import Storage
    from components.latents.config import LatentsConfig
    from components.latents.load import load_latent_shards
    from components.latents.run import encode_shard, run

    manifest, _, shard, _ = vq_step
    with pytest.raises(ValueError, match="posterior: mode"):
        run(LatentsConfig(posterior="sample"), {"shard": shard, "autoencoder": manifest},
            make_ctx(tmp_path, "latents"))

    output = Storage.from_uri(str(tmp_path / "latents"))
    model, meta = load_autoencoder(manifest)
    result = encode_shard("val", 0, shard.location, shard.info["val_shards"][0], model, meta, LatentsConfig(), output)
    assert result["count"] == 32
    from components.common.shard_reader import read_image_shards

    val, _, _ = read_image_shards(shard.storage(), shard.info["val_shards"], "png")
    from components.common.step import Manifest

    latent_manifest = Manifest("latents", "k", "1", output.uri(), {}, {}, [], info={"val_shards": [result["file"]]})
    latents, _ = load_latent_shards(latent_manifest, "val")
    torch.testing.assert_close(latents, encode_scaled(model, meta, val), rtol=1e-4, atol=1e-4)
    codes = model.quantizer.lookup(model.quantize(latents / meta.scale_factor)[2].indices)
    assert not torch.allclose(latents / meta.scale_factor, codes)  # continuous, not codes
    assert json.loads(manifest.storage().read_text(AE_META))["regularizer"] == "vq"  # what the latents step reads
