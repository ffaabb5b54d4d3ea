"""The controlnet step on 2 Ray Train workers: interrupted by a crash inside a worker, resumed from its
checkpoint, exported; its grid logged to MLflow at the checkpoints and at the end; the exported
branch loads over the DiT it was trained on and refuses another. (A Ray Train fit costs ~25 s here.)
"""

from __future__ import annotations

import json

import pytest
import torch

from components.common.storage import Storage
from components.common.step import FileRecord, Manifest
from components.controlnet.config import ControlNetConfig
from components.controlnet.load import CONTROLNET_META, CONTROLNET_RAW_WEIGHTS, CONTROLNET_WEIGHTS, load_controlnet
from components.controlnet.task import ControlNetTask
from components.controlnet.train import GRID, TASK_CLASSES
from components.dit.load import DIT_META, DIT_WEIGHTS
from crash_hooks import crashing
from test_dit import manifest_from, mlflow_tracker, step_ctx, untrained_autoencoder_manifest

LATENT = [4, 4, 4]


def dit_manifest(root, classes, seed: int = 0) -> Manifest:
    """A dit step's output: a DiT-Micro (3 blocks) with random weights, and its dit.json."""
    from safetensors.torch import save_file

    from components.dit.model import build_dit

    torch.manual_seed(seed)
    kwargs = dict(input_size=4, in_channels=4, num_classes=len(classes), learn_sigma=False, depth=3,
                  hidden_size=64, num_heads=2, patch_size=2, class_dropout_prob=0.1, mlp_ratio=4.0)
    dit = build_dit("DiT-Micro/2", **kwargs)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.1)
    out = root / f"dit{seed}"
    out.mkdir()
    save_file(dit.state_dict(), str(out / DIT_WEIGHTS))
    meta = {"model": dit.arguments, "schedule": "scaled_linear", "num_timesteps": 1000, "prediction": "eps",
            "learn_sigma": False, "num_classes": len(classes), "null_label": len(classes), "latent_shape": LATENT,
            "classes": classes, "image_channels": 1, "image_size": 8}
    (out / DIT_META).write_text(json.dumps(meta))
    storage = Storage.from_uri(str(out))
    files = [FileRecord(p, storage.sha256(p), storage.size(p)) for p in (DIT_WEIGHTS, DIT_META)]
    return Manifest(step="dit", cache_key=f"k{seed}", code_version="1", location=str(out), config={}, upstream={},
                    files=files, info=meta)


@pytest.mark.integration
def test_step_on_two_workers_resumes_after_a_crash_logs_its_grid_and_exports(ray_cluster, tmp_path, monkeypatch):
    from components.common.train_types import TrainingError
    from components.controlnet.train import run as train_controlnet
    from components.shard.config import ShardConfig
    from components.shard.run import run as shard

    ctx = step_ctx(tmp_path, "shard")
    shard_manifest = manifest_from(shard(ShardConfig(max_samples=120, image_size=8, samples_per_shard=60,
                                                     val_fraction=0.2), {}, ctx), ctx)
    classes = shard_manifest.info["classes"]
    inputs = {"shard": shard_manifest, "autoencoder": untrained_autoencoder_manifest(tmp_path, classes),
              "dit": dit_manifest(tmp_path, classes)}
    tracker = mlflow_tracker(tmp_path)
    cfg = ControlNetConfig(num_blocks=2, grid_controls=3, grid_per_control=2, sample={"steps": 3, "guidance": 1.5},
                           train={"max_steps": 6, "batch_size": 16, "lr": 1e-3, "ema_decay": 0.5, "zero_stage": 1,
                                  "checkpoint_every": 2, "log_every": 1})
    ctx = step_ctx(tmp_path, "controlnet", tracker)
    monkeypatch.setitem(TASK_CLASSES, "controlnet", crashing(ControlNetTask, at_step=5))
    with pytest.raises(TrainingError, match="injected failure at step 5"):
        train_controlnet(cfg, inputs, ctx)
    assert not ctx.output.exists(CONTROLNET_WEIGHTS)
    monkeypatch.setitem(TASK_CLASSES, "controlnet", ControlNetTask)
    out = train_controlnet(cfg, inputs, ctx)  # the same ctx.checkpoint_uri: resumes

    logged = [m.step for m in tracker.client.get_metric_history(tracker.run_id, "loss")]
    assert sorted(set(logged)) == list(range(1, 7)) and logged.count(1) == 1, logged  # resumed, not restarted
    assert out.metrics["steps"] == 6 and out.metrics["loss"] > 0
    assert sorted(out.files) == sorted([CONTROLNET_WEIGHTS, CONTROLNET_RAW_WEIGHTS, CONTROLNET_META, GRID])
    assert 0 < out.info["parameters"] < out.info["dit_parameters"]
    model, meta, dit_meta = load_controlnet(manifest_from(out, ctx), inputs["dit"])
    assert meta["control"] == "edges" and meta["num_blocks"] == 2 and len(model.controlnet.blocks) == 2
    assert any(v.abs().sum() > 0 for k, v in model.state_dict().items() if "zero_linears" in k)  # trained off zero
    with pytest.raises(ValueError, match="trained on the DiT weights with sha256"):
        load_controlnet(manifest_from(out, ctx), dit_manifest(tmp_path, classes, seed=1))

    from PIL import Image

    assert Image.open(ctx.output.path(GRID)).size == (3 * 8 + 4 * 2, 3 * 8 + 4 * 2)  # control + 2 samples, 3 rows
    series = [a.path for a in tracker.client.list_artifacts(tracker.run_id, "images")]
    assert any("samples+step+2+" in p for p in series) and any("samples+step+6+" in p for p in series), series
    assert {GRID, CONTROLNET_META} <= {a.path for a in tracker.client.list_artifacts(tracker.run_id)}
