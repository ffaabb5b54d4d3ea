"""Warm starts from the MLflow Model Registry (a real SQLite-backed registry): a DiT step's task
built from ``models:/NAME@champion`` starts from exactly the registered weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from components.common.step import FileRecord, FileRef, IntegrityError, Manifest
from components.common.storage import sha256_file
from components.common.warm_start import load_into, resolve_registered, warm_start_source
from components.dit.model import DiT
from components.dit.task import LatentDitTask
from components.dit.train import build_step_dit
from tests.test_dit import LATENT, dit_cfg


def test_a_dit_task_starts_from_the_champion(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    cfg = dit_cfg()
    kwargs = build_step_dit(cfg, LATENT, 3).arguments
    torch.manual_seed(7)
    champion = LatentDitTask(cfg, kwargs, {}).build_model()
    source = tmp_path / "dit-output"
    source.mkdir()
    save_file(champion.state_dict(), str(source / "dit.safetensors"))
    weights = source / "dit.safetensors"
    record = FileRecord("dit.safetensors", sha256_file(weights), weights.stat().st_size)
    (source / "manifest.json").write_text(Manifest("dit", "k", "1", str(source), {}, {}, [record]).to_json())
    client.create_registered_model("toy-dit")
    version = client.create_model_version("toy-dit", source=str(source))
    client.set_registered_model_alias("toy-dit", "champion", version.version)

    assert resolve_registered(uri, "models:/toy-dit@champion").version == version.version
    assert resolve_registered(uri, "models:/toy-dit/1").source == str(source)
    ref, record = warm_start_source(uri, "models:/toy-dit@champion", "dit.safetensors")
    assert ref == FileRef(str(source), "dit.safetensors", sha256_file(weights))
    assert record["warm_start_version"] == "toy-dit/1"
    champion_ref = ref
    torch.manual_seed(8)  # a different fresh initialisation, overwritten by the warm start
    started = LatentDitTask(cfg, kwargs, {}, init=ref).build_model()
    for key, value in champion.state_dict().items():
        assert torch.equal(started.state_dict()[key], value), key

    # no champion yet (the first scheduled run): from scratch, and recorded as such
    ref, record = warm_start_source(uri, "models:/toy-dit@nobody", "dit.safetensors")
    assert ref is None and "from scratch" in record["warm_start_version"]
    assert warm_start_source(uri, None, "dit.safetensors") == (None, {})
    with pytest.raises(ValueError, match="expected models:/"):
        warm_start_source(uri, "toy-dit@champion", "dit.safetensors")
    bigger = build_step_dit(dit_cfg(model={"depth": 3}), LATENT, 3).arguments
    with pytest.raises(ValueError, match="do not fit this model"):
        load_into(DiT(**bigger), champion_ref)
    # weights changed after they were registered: refused, naming the file, before they are loaded
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="dit-output/dit.safetensors"):
        load_into(DiT(**kwargs), champion_ref)
