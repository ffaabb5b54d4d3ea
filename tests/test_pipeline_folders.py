"""The pipeline on a folder of the user's images: a retrain re-runs only when the folder changes,
and an RGB folder trains with the smoke recipe given only its source and channels."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from components.common.step import read_manifest_at
from components.common.storage import Storage
from conftest import latentflow as cli
from test_pipeline import EXPECTED_STEPS, SMOKE


@pytest.mark.integration
def test_retrain_reruns_only_when_the_source_changes(tmp_path):
    """What a schedule runs: twice on an unchanged folder nothing re-runs; a new image re-runs the
    shard step (the source fingerprint is in its cache key)."""
    import numpy as np

    from components.shard.sources import mnist_arrays

    images, labels = mnist_arrays()
    source = tmp_path / "digits"
    for i in range(40):
        folder = source / str(int(labels[i * 50]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i * 50]).save(folder / f"{i}.png")
    config = tmp_path / "retrain.yaml"
    config.write_text(f"name: retrain\nstorage: {{root: {tmp_path / 'out'}}}\n"
                      f"shard: {{source: {source}, image_size: 16, samples_per_shard: 20, val_fraction: 0.2,\n"
                      f"        resources: {{num_workers: 1}}}}\n")
    first = cli("retrain", str(config))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "ran shard" in " ".join(first.stdout.split()) and "promotion gate" in first.stdout
    again = cli("retrain", str(config))
    assert again.returncode == 0 and "cached shard" in " ".join(again.stdout.split())
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(source / "3" / "new.png")
    changed = cli("retrain", str(config))
    assert changed.returncode == 0 and "ran shard" in " ".join(changed.stdout.split()), changed.stdout[-2000:]


def rgb_folder(root, per_class: int = 40, size: int = 32):
    """A class folder of small RGB images: each class a hue, each image a noisy disc somewhere."""
    import numpy as np

    rng = np.random.default_rng(0)
    hues = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}
    yy, xx = np.mgrid[:size, :size]
    for name, colour in hues.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, 9))]
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)[..., None]
            pixels = np.where(disc, colour, 20) + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(root / name / f"{i}.png")
    return root


@pytest.mark.integration
def test_an_rgb_folder_trains_with_two_settings(tmp_path):
    """The models follow the data: the smoke recipe's models are grayscale presets, yet a 3-class RGB
    folder trains end to end with the source and its channels set, and nothing else."""
    source = rgb_folder(tmp_path / "colours")
    root = tmp_path / "out"
    two = ["--set", f"shard.source={source}", "--set", "shard.channels=3"]
    done = cli("run", str(SMOKE), *two, "--set", f"storage.root={root}", "--workflow-id", "rgb", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    storage = Storage.from_uri(str(root))
    steps = {r["name"]: r for r in json.loads(storage.read_text("workflows/rgb/summary.json"))["steps"]}
    assert set(steps) == set(EXPECTED_STEPS) and all(r["status"] == "ran" for r in steps.values()), steps
    manifests = {name: read_manifest_at(r["manifest_uri"]) for name, r in steps.items()}
    assert manifests["shard"].info["channels"] == 3 and len(manifests["shard"].info["classes"]) == 3
    ae = json.loads(Storage.from_uri(manifests["autoencoder"].output_uri).read_text("autoencoder.json"))
    assert ae["model"]["in_channels"] == 3  # ae-mnist's own is 1
    dit = json.loads(Storage.from_uri(manifests["dit"].output_uri).read_text("dit.json"))
    assert dit["num_classes"] == 3 and dit["image_channels"] == 3
    grid = Image.open(io.BytesIO(Storage.from_uri(manifests["evaluate"].output_uri).read_bytes("eval_samples.png")))
    assert grid.mode == "RGB" and grid.size[0] > 16
