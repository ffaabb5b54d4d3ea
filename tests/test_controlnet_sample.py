"""``latentflow sample --control``: a workflow's ControlNet (real file formats, untrained autoencoder,
perturbed DiT and branch) sampled from the command line; ``--control-scale 0`` gives the DiT's own
images bit for bit, a control of the wrong shape is refused naming the expected one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.common.storage import Storage
from components.controlnet.load import CONTROLNET_META, CONTROLNET_WEIGHTS, dit_weights_digest
from components.dit.config import SamplingConfig
from test_evaluate import build_workflow, sample_cli, write_step

pytestmark = pytest.mark.usefixtures("one_thread")


def add_controlnet(root: Path, workflow_id: str) -> None:
    """A controlnet step over the workflow's DiT (its branch perturbed off zero), named in summary.json."""
    from safetensors.torch import save

    from components.common.step import read_manifest_at
    from components.controlnet.model import ControlledDiT
    from components.dit.load import load_dit

    storage = Storage.from_uri(str(root))
    summary = json.loads(storage.read_text(f"workflows/{workflow_id}/summary.json"))
    dit_manifest = read_manifest_at(next(s for s in summary["steps"] if s["name"] == "dit")["manifest_uri"])
    dit, dit_meta = load_dit(dit_manifest)
    model = ControlledDiT(dit, 1)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.controlnet.parameters():
            p.add_(0.3 * torch.randn_like(p))
    meta = {key: dit_meta[key] for key in ("schedule", "num_timesteps", "prediction", "learn_sigma", "num_classes",
                                           "null_label", "latent_shape", "classes", "image_channels", "image_size")}
    meta |= {"control": "edges", "num_blocks": 1, "control_scale": 1.0, "edge_threshold": 0.25,
             "dit_weights_sha256": dit_weights_digest(dit_manifest), "dit_step": "dit",
             "sampling": SamplingConfig(steps=3, guidance=1.0).model_dump(), "max_steps": 1, "ema_decay": 0.0}
    manifest = write_step(root, "controlnet", {CONTROLNET_WEIGHTS: save(model.state_dict()),
                                               CONTROLNET_META: json.dumps(meta).encode()})
    summary["steps"].append({"name": "controlnet", "status": "ran", "cache_key": "k", "mlflow_run_id": None,
                             "manifest_uri": manifest.uri("manifest.json")})
    storage.write_text(f"workflows/{workflow_id}/summary.json", json.dumps(summary))


@pytest.fixture(scope="module")
def controlled_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("control")
    build_workflow(base / "outputs" / "mnist", "wf-c")
    add_controlnet(base / "outputs" / "mnist", "wf-c")
    controls = base / "controls"
    controls.mkdir()
    for k in range(2):
        edges = np.zeros((8, 8), dtype=np.uint8)
        edges[2 + k:6, 2] = edges[2 + k:6, 5] = 255
        Image.fromarray(edges).save(controls / f"c{k}.png")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(base / "big.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(base / "rgb.png")
    return base


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_control_scale_zero_gives_the_dits_samples_and_one_steers_them(controlled_root):
    base, common = controlled_root, ["--workflow-id", "wf-c", "--labels", "0,2", "--per-label", "2", "--seed", "3"]
    plain = sample_cli(*common, "--out", str(base / "plain"), cwd=base)
    assert plain.exit_code == 0, plain.output
    zero = sample_cli(*common, "--control", str(base / "controls"), "--control-scale", "0", "--out",
                      str(base / "zero"), cwd=base)
    assert zero.exit_code == 0, zero.output
    assert "8 images under 2 edges control(s), scale 0" in zero.output
    for k in range(2):
        for label in (0, 2):
            for i in range(2):
                assert np.array_equal(pixels(base / "zero" / str(k) / f"{label}_{i}.png"),
                                      pixels(base / "plain" / str(label) / f"{i}.png")), (k, label, i)
    steered = sample_cli(*common, "--control", str(base / "controls" / "c0.png"), "--out", str(base / "one"), cwd=base)
    assert steered.exit_code == 0, steered.output
    assert not np.array_equal(pixels(base / "one" / "0" / "0_0.png"), pixels(base / "plain" / "0" / "0.png"))
    record = json.loads((base / "one" / "controls.json").read_text())
    assert record["control_scale"] == 1.0 and record["labels"] == [0, 2] and len(record["controls"]) == 1
    assert Image.open(base / "one" / "grid.png").size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # control + 2, 2 rows


@pytest.mark.parametrize("image,shape", [("big.png", "1x10x10"), ("rgb.png", "3x8x8")])
def test_a_control_of_the_wrong_shape_is_refused_naming_the_expected_one(controlled_root, image, shape):
    result = sample_cli("--workflow-id", "wf-c", "--labels", "0", "--per-label", "1", "--control",
                        str(controlled_root / image), "--out", str(controlled_root / "bad"), cwd=controlled_root)
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert f"{image}: is {shape} (channels x height x width); this ControlNet takes 1x8x8 control images" in message


def test_control_flags_that_do_not_go_together_exit_2(controlled_root):
    base = ["--workflow-id", "wf-c", "--labels", "0", "--per-label", "1", "--out", str(controlled_root / "x")]
    alone = sample_cli(*base, "--control-scale", "0.5", cwd=controlled_root)
    assert alone.exit_code == 2 and "--control-scale goes with --control" in alone.output
    cascade = sample_cli(*base, "--control", str(controlled_root / "controls"), "--step", "cascade",
                         cwd=controlled_root)
    assert cascade.exit_code == 2 and "not --step cascade" in cascade.output
    missing = sample_cli(*base, "--control", str(controlled_root / "nowhere"), cwd=controlled_root)
    assert missing.exit_code == 2 and "no such file or folder" in missing.output
