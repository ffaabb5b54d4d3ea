"""The controlnet step's fixtures, and control fidelity in evaluate. The step itself on 2 Ray Train workers
(export, MLflow grid series, loading over its DiT and refusing another) runs in the stage contract on the
smoke workflow's storage (tests/test_stage_contract.py::TestControlNet), its resume in the resume contract
(tests/test_resume_contract.py)."""

from __future__ import annotations

import json

import pytest
import torch

import metas
from components.common.storage import Storage
from components.common.step import FileRecord, Manifest
from components.controlnet.config import ControlNetConfig
from components.controlnet.load import CONTROLNET_META, CONTROLNET_WEIGHTS
from components.dit.load import DIT_META, DIT_WEIGHTS
from test_dit import manifest_from, step_ctx, untrained_autoencoder_manifest

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
    meta = metas.dit_meta(model=dit.arguments, schedule="scaled_linear", num_timesteps=1000, prediction="eps",
                          learn_sigma=False, num_classes=len(classes), null_label=len(classes),
                          latent_shape=list(LATENT), classes=classes, image_channels=1, image_size=8)
    (out / DIT_META).write_text(json.dumps(meta.to_json()))
    storage = Storage.from_uri(str(out))
    files = [FileRecord(p, storage.sha256(p), storage.size(p)) for p in (DIT_WEIGHTS, DIT_META)]
    return Manifest(step="dit", cache_key=f"k{seed}", code_version="1", location=str(out), config={}, upstream={},
                    files=files, info=meta.to_json())


# ---------------------------------------------------------------- control fidelity in evaluate


def controlnet_manifest(root, dit: Manifest, cfg: ControlNetConfig) -> Manifest:
    """A controlnet step's output over ``dit``: its branch perturbed off zero, controlnet.json from step_meta."""
    from safetensors.torch import save_file

    from components.controlnet.model import ControlledDiT
    from components.controlnet.train import step_meta
    from components.dit.load import load_dit

    dit_model, dit_meta = load_dit(dit)
    model = ControlledDiT(dit_model, cfg.num_blocks)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.controlnet.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = root / "controlnet"
    out.mkdir()
    save_file(model.state_dict(), str(out / CONTROLNET_WEIGHTS))
    (out / CONTROLNET_META).write_text(json.dumps(step_meta(cfg, dit, dit_meta)))
    storage = Storage.from_uri(str(out))
    files = [FileRecord(p, storage.sha256(p), storage.size(p)) for p in (CONTROLNET_WEIGHTS, CONTROLNET_META)]
    return Manifest(step="controlnet", cache_key="k", code_version="1", location=str(out), config={}, upstream={},
                    files=files, info={})


def test_edge_f1_matches_within_a_pixel():
    from components.evaluate.control_fidelity import edge_f1

    a = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    a[:, :, 2, 1:7] = 255
    b = a.clone()
    b[1] = torch.roll(a[1], 1, dims=-2)  # one pixel off: within the tolerance
    b[2] = 0
    b[2, :, 6, :] = 255  # four rows off: no match
    a[3], b[3] = 0, 0  # both empty
    assert edge_f1(a, b).tolist() == [1.0, 1.0, 0.0, 1.0]
    b[0, :, 5, 1:7] = 255  # as many false edges as true ones: precision 1/2, recall 1
    assert edge_f1(a, b)[0] == pytest.approx(2 / 3)


@pytest.mark.parametrize("control", ["edges", "blur"])
def test_evaluate_reports_control_fidelity_beside_the_uncontrolled_samples(tmp_path, control):
    from components.evaluate.config import EvaluateConfig
    from components.evaluate.classifier import build_classifier
    from components.evaluate.run import _optional_tables
    from components.shard.config import ShardConfig
    from components.shard.run import run as shard

    ctx = step_ctx(tmp_path, "shard")
    shard_manifest = manifest_from(shard(ShardConfig(max_samples=60, image_size=8, samples_per_shard=60,
                                                     val_fraction=0.3), {}, ctx), ctx)
    classes = shard_manifest.info["classes"]
    dit = dit_manifest(tmp_path, classes)
    inputs = {"shard": shard_manifest, "autoencoder": untrained_autoencoder_manifest(tmp_path, classes), "dit": dit,
              "controlnet": controlnet_manifest(tmp_path, dit, ControlNetConfig(control=control, num_blocks=2))}
    torch.manual_seed(0)
    judge = type("Judge", (), {"model": build_classifier("cnn-tiny", 1, len(classes)).eval()})()  # untrained: scores only
    cfg = EvaluateConfig(control_samples=6, sample={"steps": 3, "guidance": 1.0})
    metrics, evaluation = {}, {}
    files = _optional_tables(cfg, inputs, step_ctx(tmp_path, "evaluate"), judge, None, None, classes, "cpu", None,
                             metrics, evaluation)
    measure = "edge_f1" if control == "edges" else "signal_mae"
    assert files == ["eval_control.png"] and evaluation["control"]["count"] == 6
    for name in (f"control_{measure}", f"uncontrolled_{measure}", "control_digit_accuracy",
                 "uncontrolled_digit_accuracy"):
        assert 0 <= metrics[name] <= 1, name
    assert metrics[f"control_{measure}"] != metrics[f"uncontrolled_{measure}"]  # the control changed the samples
    assert evaluation["control"]["metrics"] == metrics and evaluation["control"]["control"] == control
