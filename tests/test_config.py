"""Typed configs: every problem is reported with its file and dotted key before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.common.config import ConfigError, apply_overrides, parse_override, redact
from pipelines.config import load_pipeline_config

PRESETS = sorted(Path(__file__).resolve().parents[1].glob("configs/pipeline/*.yaml"))


def write(tmp_path, data) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base() -> dict:
    return {"name": "t", "storage": {"root": "./x"}, "shard": {"source": "builtin:mnist"}}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates(preset):
    cfg = load_pipeline_config(preset)
    assert cfg.name == preset.stem


def test_unknown_key_names_the_dotted_key_and_file(tmp_path):
    data = base()
    data["shard"]["samples_per_shrad"] = 10
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(path)
    assert str(path) in str(e.value) and "unknown key 'shard.samples_per_shrad'" in str(e.value)


def test_unknown_section(tmp_path):
    data = base() | {"ditt": {}}
    with pytest.raises(ConfigError, match="unknown key 'ditt'"):
        load_pipeline_config(write(tmp_path, data))


def test_wrong_type_and_bad_value(tmp_path):
    data = base()
    data["shard"]["image_size"] = "big"
    data["shard"]["val_fraction"] = 1.5
    data["shard"]["resources"] = {"num_gpus": -1}
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(write(tmp_path, data))
    text = str(e.value)
    assert "shard.image_size" in text and "'big'" in text
    assert "shard.val_fraction" in text
    assert "shard.resources.num_gpus" in text


def test_invalid_choice(tmp_path):
    data = base()
    data["shard"]["on_bad_sample"] = "ignore"
    with pytest.raises(ConfigError, match="shard.on_bad_sample"):
        load_pipeline_config(write(tmp_path, data))


def test_set_overrides_are_typed_like_the_field(tmp_path):
    path = write(tmp_path, base())
    cfg = load_pipeline_config(path, ["shard.image_size=64", "shard.val_fraction=5e-2",
                                      "shard.max_samples=100", "shard.source=/data/imgs",
                                      "shard.resources.num_workers=3", "ray.runtime_env={env_vars: {A: b}}"])
    assert cfg.shard.image_size == 64 and isinstance(cfg.shard.image_size, int)
    assert cfg.shard.val_fraction == pytest.approx(0.05)
    assert cfg.shard.source == "/data/imgs"
    assert cfg.shard.resources.num_workers == 3
    assert cfg.ray.runtime_env == {"env_vars": {"A": "b"}}
    with pytest.raises(ConfigError, match="shard.image_size") as e:
        load_pipeline_config(path, ["shard.image_size=abc"])
    assert "--set" in str(e.value)
    with pytest.raises(ConfigError, match="unknown key 'shard.nope'"):
        load_pipeline_config(path, ["shard.nope=1"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("shard.image_size")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])
    # list entries by index (the cascade's superres stages)
    stages = {"superres": [{"train": {"max_steps": 1}}]}
    assert apply_overrides(stages, ["superres.0.train.max_steps=7"])["superres"][0]["train"]["max_steps"] == 7
    with pytest.raises(ConfigError, match="superres.1: the list has entries 0..0"):
        apply_overrides(stages, ["superres.1.train.max_steps=7"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_pipeline_config(bad)


def test_credentials_never_in_storage_uri(tmp_path):
    data = base()
    data["storage"]["root"] = "s3://AKIA:secret@bucket/prefix"
    with pytest.raises(ConfigError, match="storage.root"):
        load_pipeline_config(write(tmp_path, data))


def test_redact_hides_secret_looking_keys():
    assert redact({"a": {"api_token": "x", "lr": 1}, "password": "p"}) == {"a": {"api_token": "***", "lr": 1},
                                                                           "password": "***"}


def test_cache_exempt_fields_stay_out_of_cache_keys():
    from components.common.config import StepConfig
    from components.common.trainer import TrainConfig

    class Stage(StepConfig):
        lr_scale: float = 1.0
        train: TrainConfig = TrainConfig()

    a, b = Stage(), Stage()
    b.train.log_every, b.train.checkpoint_every, b.resources.num_workers = 7, 3, 4
    assert a.cache_relevant() == b.cache_relevant()
    assert "resources" not in a.cache_relevant() and "log_every" not in a.cache_relevant()["train"]
    b.train.lr = 0.5
    assert a.cache_relevant() != b.cache_relevant()
