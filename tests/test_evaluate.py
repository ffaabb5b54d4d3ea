"""The evaluate step and ``latentflow sample``.

- the classifier on real digits (the real shard step, ~1,000 digits) and the evaluate step's
  outputs, with a stand-in *generator* (the DiT is tested in test_dit.py): one classifier
  training (~20 s here) serves the accuracy, Fréchet and output checks;
- ``latentflow sample`` on a workflow assembled by hand (untrained DiT-Micro + ae-tiny in the
  steps' real file formats, a real summary.json): layout, grid, determinism, errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from components.autoencoder.load import AE_META, AE_WEIGHTS
from components.common.config import StepResources
from components.common.step import FileRecord, Manifest, StepContext, StepOutput
from components.common.storage import Storage
from components.common.tracking import StepTracker
from components.dit.config import SamplingConfig
from components.dit.load import DIT_META, DIT_WEIGHTS
from components.evaluate import run as evaluate_module
from components.evaluate.config import ClassifierTrainConfig, EvaluateConfig
from components.evaluate.judge import classify, fit_judge, read_split, tensor_batches, train_classifier
from components.evaluate.load import CLASSIFIER_META, CLASSIFIER_WEIGHTS, load_classifier
from components.evaluate.metrics import feature_stats, frechet_distance_of
from components.evaluate.run import EVALUATION, SAMPLES_GRID
from conftest import REPO
from pipelines.cli import app
import metas
from rounding import assert_same_up_to_rounding

# ~20 s on 2 shared cores; ~95 % on held-out digits
QUICK_CLASSIFIER = ClassifierTrainConfig(preset="cnn-tiny", steps=200, batch_size=64, lr=1e-2, max_shift=1)


def make_ctx(root: Path, step: str, tracker: StepTracker | None = None) -> StepContext:
    return StepContext(step=step, workflow_id="t", cache_key="k", root=Storage.from_uri(str(root)),
                       output=Storage.from_uri(str(root / step)),
                       resources=StepResources(num_cpus=1, num_workers=2, cpus_per_worker=0.5),
                       tracker=tracker or StepTracker("sqlite:///unused", None))


def manifest_from(out: StepOutput, ctx: StepContext, config: dict | None = None) -> Manifest:
    """What the workflow runner would write for ``out``."""
    files = [FileRecord(p, ctx.output.sha256(p), ctx.output.size(p)) for p in sorted(out.files)]
    return Manifest(step=ctx.step, cache_key="k", code_version="1", location=ctx.output.uri(),
                    config=config or {}, upstream={}, files=files, metrics=out.metrics, info=out.info)


# ---------------------------------------------------------------- the classifier and the step


def test_classifier_training_is_seeded():
    from components.shard.sources import mnist_arrays

    pixels, labels = mnist_arrays()  # sorted by class: take every 50th
    images = torch.from_numpy(np.pad(pixels[::50][:64], ((0, 0), (2, 2), (2, 2)))[:, None].copy())
    labels = labels[::50][:64]
    cfg = ClassifierTrainConfig(preset="cnn-tiny", steps=3, batch_size=16)
    def train(cfg, classes=10):
        return train_classifier(tensor_batches(images, labels, cfg.batch_size, cfg.seed), classes, cfg)

    a, stats = train(cfg)
    b, _ = train(cfg)
    c, _ = train(cfg.model_copy(update={"seed": 1}))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert not a.training and stats["classifier_train_loss"] > 0
    with pytest.raises(ValueError, match=r"labels in \[0, 5\)"):
        train(cfg, classes=5)


@pytest.fixture(scope="module")
def digit_shards(ray_cluster, tmp_path_factory) -> Manifest:
    """1,000 bundled digits through the real shard step: ~800 train, ~200 validation."""
    from components.shard.config import ShardConfig
    from components.shard.run import run as shard

    ctx = make_ctx(tmp_path_factory.mktemp("shards"), "shard")
    cfg = ShardConfig(source="builtin:mnist", max_samples=1000, samples_per_shard=500, val_fraction=0.2)
    return manifest_from(shard(cfg, {}, ctx), ctx)


def sqlite_tracker(path: Path) -> StepTracker:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    return StepTracker(uri, client.create_run(client.create_experiment("evaluate-test")).info.run_id)


@pytest.mark.integration
def test_evaluate_step_trains_an_accurate_classifier_and_scores_samples(digit_shards, tmp_path, monkeypatch):
    train_x, train_y = read_split(digit_shards, "train")
    val_x, val_y = read_split(digit_shards, "val")
    assert len(train_x) + len(val_x) == 1000 and len(val_x) > 150 and train_x.shape[1:] == (1, 32, 32)

    calls = []

    def perfect_generator(inputs, labels, sampling, batch_size, device, classes, prompts=None):
        """Stands in for the class-conditional DiT: real training digits of each requested class."""
        assert prompts is None  # no text DiT among the inputs: sampled by label
        calls.append((labels.clone(), sampling, batch_size))
        pools = {k: np.flatnonzero(train_y == k) for k in range(10)}
        return torch.from_numpy(train_x[[pools[int(k)][i % len(pools[int(k)])] for i, k in enumerate(labels)]])

    monkeypatch.setattr(evaluate_module, "generate_samples", perfect_generator)
    tracker = sqlite_tracker(tmp_path)
    ctx = make_ctx(tmp_path, "evaluate", tracker)
    cfg = EvaluateConfig(classifier=QUICK_CLASSIFIER, samples_per_class=20, sample=SamplingConfig(steps=3, seed=7),
                         batch_size=64, resources=StepResources(num_cpus=1))
    out = evaluate_module.run(cfg, {"shard": digit_shards, "autoencoder": None, "dit": None}, ctx)

    m = out.metrics
    print(f"\nclassifier: val accuracy {m['classifier_val_accuracy']:.3f} in "
          f"{m['classifier_train_seconds']:.1f} s; FD {m['frechet_distance']:.3f}, "
          f"baseline {m['frechet_distance_real_baseline']:.3f}")
    assert m["classifier_val_accuracy"] >= 0.9
    labels, sampling, batch_size = calls[0]
    assert torch.equal(labels, torch.arange(10).repeat_interleave(20)) and sampling.seed == 7 and batch_size == 64
    # real digits as "samples": classified as well as the classifier does on data it has seen
    assert m["sample_accuracy"] >= 0.9
    assert all(m[f"sample_accuracy_class_{k}"] >= 0.6 for k in range(10))
    assert np.mean([m[f"sample_accuracy_class_{k}"] for k in range(10)]) == pytest.approx(m["sample_accuracy"])
    assert m["frechet_distance"] == pytest.approx(m["frechet_distance_real_baseline"], rel=0.5)

    # files, in ctx.output and MLflow
    assert sorted(out.files) == sorted([CLASSIFIER_WEIGHTS, CLASSIFIER_META, SAMPLES_GRID, EVALUATION])
    evaluation = json.loads(ctx.output.read_text(EVALUATION))
    assert evaluation["metrics"] == pytest.approx(m) and evaluation["sampling"]["steps"] == 3
    assert evaluation["counts"] == {"train": len(train_x), "val": len(val_x), "generated": 200,
                                    "samples_per_class": 20, "baseline_train": 200}
    grid = Image.open(ctx.output.path(SAMPLES_GRID))
    assert grid.size == (10 * 32 + 11 * 2, 10 * 32 + 11 * 2)  # 10 per class, a row per class
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.metrics["sample_accuracy"] == pytest.approx(m["sample_accuracy"])
    assert run.data.metrics["classifier_val_accuracy"] == pytest.approx(m["classifier_val_accuracy"])
    assert {SAMPLES_GRID, EVALUATION} <= {a.path for a in tracker.client.list_artifacts(tracker.run_id)}

    # the saved classifier is the trained one; real-vs-real is far below real-vs-noise
    classifier, meta = load_classifier(manifest_from(out, ctx))
    assert meta["num_classes"] == 10 and meta["classes"] == digit_shards.info["classes"]
    val_logits, val_features = classify(classifier, val_x)
    assert (val_logits.argmax(1) == val_y).mean() == pytest.approx(m["classifier_val_accuracy"])
    _, train_features = classify(classifier, train_x[: len(val_x)])
    noise = torch.randint(0, 256, val_x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    _, noise_features = classify(classifier, noise)
    real_vs_real = frechet_distance_of(val_features, train_features)
    assert real_vs_real < 0.2 * frechet_distance_of(val_features, noise_features)


@pytest.mark.integration
def test_the_judge_streams_and_its_running_statistics_are_the_whole_splits(digit_shards, monkeypatch):
    """The judge never holds a split: it trains on streamed batches of at most batch_size images, and
    its validation statistics, accumulated batch by batch, equal those of the whole split at once."""
    from components.evaluate import judge as judge_module

    largest = []
    real_classify = judge_module.classify

    def spy(model, images, *args, **kwargs):
        largest.append(len(images))
        return real_classify(model, images, *args, **kwargs)

    monkeypatch.setattr(judge_module, "classify", spy)
    cfg = QUICK_CLASSIFIER.model_copy(update={"steps": 20})
    judge = fit_judge(digit_shards, None, "bicubic", cfg, 10)
    assert max(largest) <= judge_module.SCORE_BATCH < judge.train_count
    val_x, val_y = read_split(digit_shards, "val")
    logits, features = real_classify(judge.model, val_x)
    mean, covariance = feature_stats(features)
    assert judge.val.count == len(val_x)
    assert judge.val.accuracy == pytest.approx(float((logits.argmax(1) == val_y).mean()))
    np.testing.assert_allclose(judge.val.moments.mean, mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(judge.val.moments.covariance(), covariance, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- latentflow sample


CLASSES = ["zero", "one", "two"]
LATENT = [4, 4, 4]  # ae-tiny (f=2) on 8x8 grayscale images


def write_step(root: Path, name: str, files: dict[str, bytes], config: dict | None = None,
               info: dict | None = None) -> Manifest:
    out = Storage.from_uri(str(root / "steps" / name / "k"))
    for rel, data in files.items():
        out.write_bytes(rel, data)
    records = [FileRecord(rel, out.sha256(rel), out.size(rel)) for rel in sorted(files)]
    manifest = Manifest(step=name, cache_key="k", code_version="1", location=out.uri(), config=config or {},
                        upstream={}, files=records, info=info or {})
    out.write_text("manifest.json", manifest.to_json())
    return manifest


def build_workflow(root: Path, workflow_id: str) -> None:
    """An autoencoder and a DiT step's outputs in their real file formats (untrained weights,
    the DiT's perturbed so labels matter) and a summary.json naming them, as ``latentflow run``
    leaves them."""
    from safetensors.torch import save

    from components.autoencoder.model import AUTOENCODER_PRESETS, build_autoencoder
    from components.dit.model import build_dit

    torch.manual_seed(0)
    ae_kwargs = {**AUTOENCODER_PRESETS["ae-tiny"], "in_channels": 1}
    ae = build_autoencoder("ae-tiny", **ae_kwargs)
    ae_meta = metas.ae_meta(model=ae_kwargs, latent_shape=LATENT, scale_factor=1.0, scale_from="none",
                            classes=CLASSES).to_json()
    dit_kwargs = dict(input_size=4, in_channels=4, num_classes=3, learn_sigma=False, depth=2, hidden_size=64,
                      num_heads=2, patch_size=2)
    dit = build_dit("DiT-Micro/2", **dit_kwargs)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dit_meta = metas.dit_meta(model=dit_kwargs, num_classes=3, null_label=dit.null_class_id, latent_shape=LATENT,
                              classes=CLASSES).to_json()  # no sampling: sampled with the step's config
    ae_manifest = write_step(root, "autoencoder", {AE_WEIGHTS: save(ae.state_dict()),
                                                   AE_META: json.dumps(ae_meta).encode()})
    dit_manifest = write_step(root, "dit", {DIT_WEIGHTS: save(dit.state_dict()),
                                            DIT_META: json.dumps(dit_meta).encode()},
                              config={"sample": SamplingConfig(steps=3, guidance=1.0).model_dump()})
    steps = [{"name": m.step, "status": "ran", "cache_key": "k", "manifest_uri": m.uri("manifest.json"),
              "mlflow_run_id": None} for m in (ae_manifest, dit_manifest)]
    steps.append({"name": "evaluate", "status": "failed", "cache_key": "k", "manifest_uri": None,
                  "mlflow_run_id": None, "error": "boom"})
    Storage.from_uri(str(root)).write_text(f"workflows/{workflow_id}/summary.json",
                                           json.dumps({"workflow_id": workflow_id, "steps": steps}))


@pytest.fixture(scope="module")
def workflow_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("sample")
    build_workflow(base / "outputs" / "mnist", "wf-1")
    return base


def sample_cli(*args: str, cwd: Path | None = None):
    """``latentflow sample`` in this process (the console script itself runs once below)."""
    old = Path.cwd()
    os.chdir(cwd or old)
    try:
        return CliRunner().invoke(app, ["sample", *args])
    finally:
        os.chdir(old)


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_sample_writes_every_image_and_a_grid_deterministically(workflow_root, tmp_path):
    root = workflow_root / "outputs" / "mnist"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    first = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "sample", "--workflow-id", "wf-1", "--storage", str(root),
         "--labels", "0,two", "--per-label", "3", "--seed", "5", "--out", str(tmp_path / "a")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "ddim, 3 steps, guidance 1" in first.stdout  # the DiT step's sampling settings
    files = pngs(tmp_path / "a")
    assert sorted(files) == ["0/0.png", "0/1.png", "0/2.png", "2/0.png", "2/1.png", "2/2.png", "grid.png"]
    for name, data in files.items():
        image = Image.open(tmp_path / "a" / name)
        assert image.mode == "L"
        assert image.size == ((8, 8) if name != "grid.png" else (3 * 8 + 4 * 2, 2 * 8 + 3 * 2))  # rows = labels

    # the same seed again (found by searching ./outputs, names or indices alike): the same bytes
    again = sample_cli("--workflow-id", "wf-1", "--labels", "zero,2", "--per-label", "3", "--seed", "5",
                       "--batch-size", "2", "--out", str(tmp_path / "b"), cwd=workflow_root)
    assert again.exit_code == 0, again.output
    assert sorted(pngs(tmp_path / "b")) == sorted(files)
    for name in files:  # another batch size: the same images up to rounding (tests/rounding.py)
        same = [torch.from_numpy(np.array(Image.open(folder / name))) for folder in (tmp_path / "a", tmp_path / "b")]
        assert_same_up_to_rounding(*same)
    other = sample_cli("--workflow-id", "wf-1", "--labels", "0,2", "--per-label", "3", "--seed", "6",
                       "--sampler", "ddpm", "--steps", "2", "--guidance", "0", "--out", str(tmp_path / "c"),
                       cwd=workflow_root)
    assert other.exit_code == 0, other.output
    assert "ddpm, 2 steps, guidance 0" in other.output
    assert pngs(tmp_path / "c")["0/0.png"] != files["0/0.png"]


def test_sample_errors_name_what_is_wrong(workflow_root, tmp_path):
    root = str(workflow_root / "outputs" / "mnist")
    common = ["--per-label", "1", "--out", str(tmp_path / "out")]
    unknown = sample_cli("--workflow-id", "wf-1", "--storage", root, "--labels", "0,seven", *common)
    assert unknown.exit_code == 2 and "unknown label 'seven'" in unknown.output
    assert "0=zero, 1=one, 2=two" in unknown.output
    bad = sample_cli("--workflow-id", "wf-1", "--storage", root, "--labels", "1", "--eta", "2", *common)
    assert bad.exit_code == 2 and "--eta" in bad.output

    missing = sample_cli("--workflow-id", "wf-nope", "--labels", "0", *common, cwd=workflow_root)
    assert missing.exit_code == 1
    assert "workflow 'wf-nope' not found" in missing.output and "outputs/*/workflows/wf-nope" in missing.output
    no_step = sample_cli("--workflow-id", "wf-1", "--storage", root, "--step", "distill", "--labels", "0", *common)
    assert no_step.exit_code == 1 and "workflow 'wf-1' has no step 'distill'" in no_step.output
    failed = sample_cli("--workflow-id", "wf-1", "--storage", root, "--step", "evaluate", "--labels", "0", *common)
    assert failed.exit_code == 1 and "step 'evaluate' of workflow 'wf-1' did not finish" in failed.output

    for name in ("a", "b"):
        build_workflow(tmp_path / "outputs" / name, "wf-2")
    ambiguous = sample_cli("--workflow-id", "wf-2", "--labels", "0", *common, cwd=tmp_path)
    assert ambiguous.exit_code == 1 and "ambiguous" in ambiguous.output and "--storage" in ambiguous.output
    assert not (tmp_path / "out").exists()  # nothing written on any error


def test_sample_refuses_weights_changed_after_they_were_written(tmp_path):
    """Every read verifies its digest: a DiT file overwritten in storage (a valid safetensors file,
    other weights) is refused with exit 1, naming the file, before anything is sampled."""
    from safetensors.torch import load_file, save_file

    root = tmp_path / "outputs" / "mnist"
    build_workflow(root, "wf-1")
    weights = root / "steps" / "dit" / "k" / DIT_WEIGHTS
    tampered = {k: v + 1 for k, v in load_file(str(weights)).items()}
    save_file(tampered, str(weights))
    refused = sample_cli("--workflow-id", "wf-1", "--storage", str(root), "--labels", "0", "--per-label", "1",
                         "--out", str(tmp_path / "x"))
    assert refused.exit_code == 1, refused.output
    assert f"{weights}" in " ".join(refused.output.split()) and "sha256" in refused.output
    assert not (tmp_path / "x").exists()
