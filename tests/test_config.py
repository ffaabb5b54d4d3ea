"""Typed configs: every problem is reported with its file and dotted key before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.common.config import ConfigError, apply_overrides, parse_override
from components.common.redact import redact
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


def test_mlflow_environment_overrides_the_file_and_set_overrides_both(tmp_path, monkeypatch):
    """The order --help states: file, then MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, then --set."""
    from pipelines.jobs import entrypoint, runtime_env

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    path = write(tmp_path, {**base(), "tracking": {"uri": "http://file:5000", "experiment": "from-file"}})
    assert load_pipeline_config(path).tracking.model_dump() == {"uri": "http://file:5000", "experiment": "from-file"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ops:hunter2pass@env:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "2026")  # a name, not YAML: stays a string
    cfg = load_pipeline_config(path)
    assert (cfg.tracking.uri, cfg.experiment_name) == ("http://ops:hunter2pass@env:5000", "2026")
    cfg = load_pipeline_config(path, ["tracking.uri=http://set:5000"])
    assert (cfg.tracking.uri, cfg.tracking.experiment) == ("http://set:5000", "2026")
    (tmp_path / "bare").mkdir()
    no_section = load_pipeline_config(write(tmp_path / "bare", base()))  # no tracking section
    assert no_section.tracking.uri == "http://ops:hunter2pass@env:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # empty is unset, as MLflow reads it
    assert load_pipeline_config(path).tracking.uri == "http://file:5000"
    # the environment's password reaches the tracking client, never what leaves the process
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ops:hunter2pass@env:5000")
    assert "hunter2pass" not in str(redact(load_pipeline_config(SMOKE).resolved()))
    job = entrypoint(str(SMOKE), ["dit.train.max_steps=3"], "wf") + str(runtime_env({}))
    assert "hunter2pass" not in job and "MLFLOW_TRACKING_URI" not in job


def test_redact_hides_secret_looking_keys():
    assert redact({"a": {"api_token": "x", "lr": 1}, "password": "p"}) == {"a": {"api_token": "***", "lr": 1},
                                                                           "password": "***"}


def test_cache_exempt_fields_stay_out_of_cache_keys():
    from components.common.config import StepConfig
    from components.common.train_types import TrainConfig

    class Stage(StepConfig):
        lr_scale: float = 1.0
        train: TrainConfig = TrainConfig()

    a, b = Stage(), Stage()
    b.train.log_every, b.train.checkpoint_every, b.resources.num_workers = 7, 3, 4
    assert a.cache_relevant() == b.cache_relevant()
    assert "resources" not in a.cache_relevant() and "log_every" not in a.cache_relevant()["train"]
    b.train.lr = 0.5
    assert a.cache_relevant() != b.cache_relevant()


def test_a_renamed_field_hashes_as_before_and_its_old_name_still_loads():
    """superres ``sample.aug_level`` became ``noise_cond_aug_level`` (issue 16): what a cache key hashes is
    what it hashed under the old name, at any depth, so no cached stage re-runs."""
    from components.common.config import StrictModel
    from components.superres.config import SuperResConfig, SuperResSamplingConfig

    class Before(StrictModel):
        aug_level: float = 0.1
        seed: int = 0

    class After(StrictModel):
        noise_cond_aug_level: float = 0.1
        seed: int = 0
        cache_names = {"noise_cond_aug_level": "aug_level"}

    assert After(noise_cond_aug_level=0.3).cache_relevant() == Before(aug_level=0.3).cache_relevant()
    assert After(noise_cond_aug_level=0.3).model_dump() == {"noise_cond_aug_level": 0.3, "seed": 0}

    hashed = SuperResSamplingConfig(noise_cond_aug_level=0.25).cache_relevant()
    assert hashed["aug_level"] == 0.25 and "noise_cond_aug_level" not in hashed
    stage = SuperResConfig(input_size=8, output_size=16, sample={"noise_cond_aug_level": 0.25})
    assert stage.cache_relevant()["sample"] == hashed
    # a stage's superres.json and older pipeline files say aug_level: read as the new field
    assert SuperResSamplingConfig(aug_level=0.25) == SuperResSamplingConfig(noise_cond_aug_level=0.25)
    with pytest.raises(ValueError, match="aug_level is the old name of noise_cond_aug_level"):
        SuperResSamplingConfig(aug_level=0.25, noise_cond_aug_level=0.25)


def test_an_added_field_left_at_its_old_meaning_keeps_the_cache_key():
    """A capability added later (``cache_added``) re-keys nothing while it is off, and re-keys when it is on."""
    from components.common.config import StrictModel

    class Before(StrictModel):
        seed: int = 0

    class After(StrictModel):
        seed: int = 0
        conditioning: str = "class"
        cache_added = {"conditioning": "class"}

    assert After().cache_relevant() == Before().cache_relevant() == {"seed": 0}
    assert After(conditioning="text").cache_relevant() == {"seed": 0, "conditioning": "text"}


# ---------------------------------------------------------------- refused at plan time, not in the step

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "smoke.yaml"


def refusal(*overrides: str, path: Path = SMOKE) -> str:
    """The ConfigError text of the smoke recipe with ``overrides``; fails if it loads."""
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(path, list(overrides))
    return str(e.value)


def test_the_three_recipes_pass_the_plan_time_checks():
    names = {p.name for p in PRESETS}
    assert {"smoke.yaml", "mnist.yaml", "imagenet256.yaml"} <= names
    for name in ("smoke.yaml", "mnist.yaml", "imagenet256.yaml"):
        assert load_pipeline_config(SMOKE.parent / name).name == name.removesuffix(".yaml")


@pytest.mark.parametrize("key, value", [
    ("autoencoder.preset", "ae-nope"),
    ("dit.preset", "DiT-Huge/2"),
    ("superres.0.preset", "sr-nope"),
    ("noisy_classifier.preset", "nc-nope"),
    ("evaluate.classifier.preset", "resnet"),
    ("evaluate.cascade_classifier.preset", "resnet"),
])
def test_unknown_preset_names_the_key_and_the_valid_ones(key, value):
    text = refusal(f"{key}={value}")
    assert f"'{key}'" in text and repr(value) in text and "valid presets" in text


def test_image_size_the_autoencoder_factor_does_not_divide():
    # ae-mnist has 3 levels: f = 4; 18 px has no whole latent grid
    text = refusal("autoencoder.image_size=18", "superres=null")
    assert "autoencoder.image_size: 18 px" in text and "f=4" in text
    # without autoencoder.image_size the base is the shards' size
    text = refusal("autoencoder.image_size=null", "shard.image_size=30", "superres=null")
    assert "shard.image_size: 30 px" in text
    # the factor follows autoencoder.model's channel_mult
    text = refusal("autoencoder.image_size=20", "autoencoder.model.channel_mult=[1, 2, 4, 4]", "superres=null")
    assert "autoencoder.image_size: 20 px" in text and "f=8" in text and "autoencoder.model.channel_mult" in text


def test_dit_patch_that_does_not_divide_the_latent_grid():
    # smoke: 16 px base / f=4 = a 4x4 latent grid
    text = refusal("dit.preset=DiT-S/8")
    assert "dit.preset: the DiT's patch size 8 does not divide the latent grid 4x4" in text
    text = refusal("dit.model.patch_size=8")
    assert "dit.model.patch_size" in text
    assert load_pipeline_config(SMOKE, ["dit.preset=DiT-S/4"]).dit.preset == "DiT-S/4"


def test_fp16_on_a_step_without_gpus():
    text = refusal("dit.train.precision=fp16")
    assert "dit.train.precision: fp16 needs GPUs" in text and "dit.resources.gpus_per_worker" in text
    assert "superres.0.train.precision" in refusal("superres.0.train.precision=fp16")
    cfg = load_pipeline_config(SMOKE, ["dit.train.precision=fp16", "dit.resources.gpus_per_worker=1"])
    assert cfg.dit.train.precision == "fp16"


def test_superres_sizes_that_do_not_chain(tmp_path):
    assert "superres.0.input_size is 12" in refusal("superres.0.input_size=12")  # the base is 16 px
    assert "'superres.0.output_size'" in refusal("superres.0.output_size=16")  # not larger than its input
    data = yaml.safe_load(SMOKE.read_text())
    data["superres"].append({**data["superres"][0], "input_size": 40, "output_size": 64})
    assert "superres.1.input_size is 40" in refusal(path=write(tmp_path, data))  # stage 0 gives 32 px
    # sr-mnist's U-Net has 3 levels: its output size must divide by 4
    text = refusal("superres.0.preset=sr-mnist", "superres.0.output_size=34")
    assert "superres.0.output_size: 34 px is not divisible by 2^2" in text and "superres.0.preset" in text
    # an output larger than the shard images is only a warning of the stage (its targets are upsampled)
    assert load_pipeline_config(SMOKE, ["superres.0.output_size=64"]).superres[0].output_size == 64


def image_folder(root: Path, classes: list[str]) -> Path:
    """Tiny files stand for images: the plan-time check only looks at the folder's layout."""
    root.mkdir(parents=True)
    for name in classes:
        (root / name).mkdir()
        (root / name / "a.png").write_bytes(b"x")
    return root


def test_evaluate_on_an_unlabelled_folder(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"x")
    (flat / ".thumbs").mkdir()  # hidden, and an empty sub-folder: neither is a class of the shard step
    (flat / ".thumbs" / "a.png").write_bytes(b"x")
    (flat / "empty").mkdir()
    text = refusal(f"shard.source={flat}")
    assert "evaluate: needs a labelled data set" in text and "flat folder" in text
    assert "noisy_classifier: needs 2 or more classes" in refusal(f"shard.source={flat}", "evaluate=null",
                                                                  "noisy_classifier.preset=nc-tiny")
    assert load_pipeline_config(SMOKE, [f"shard.source={flat}", "evaluate=null"]).evaluate is None


def test_class_accuracy_gate_on_a_one_class_folder(tmp_path):
    one = image_folder(tmp_path / "one", ["cat"])
    text = refusal(f"shard.source={one}")
    assert "registry.gate_metric: 'sample_accuracy' compares classes" in text and "1 class" in text
    assert "registry.gate_metric" in refusal(f"shard.source={one}", "registry.gate_metric=cascade_sample_accuracy")
    gated_on_distance = ["registry.gate_metric=frechet_distance", "registry.gate_mode=min"]
    assert load_pipeline_config(SMOKE, [f"shard.source={one}", *gated_on_distance]).registry.gate_mode == "min"
    two = image_folder(tmp_path / "two", ["cat", "dog"])
    assert load_pipeline_config(SMOKE, [f"shard.source={two}"]).shard.source == str(two)
    # no listing at plan time for S3 or inside shards: those are the steps' to check
    for source in ("s3://bucket/flat", f"webdataset:{tmp_path / 'shards'}"):
        assert load_pipeline_config(SMOKE, [f"shard.source={source}"]).shard.source == source


def test_models_follow_the_data_and_a_disagreeing_setting_is_refused_naming_both(tmp_path):
    rgb = load_pipeline_config(SMOKE, ["shard.channels=3"])  # nothing else to set: the models take 3 channels
    assert rgb.shard.channels == 3 and "in_channels" not in rgb.autoencoder.model
    text = refusal("shard.channels=3", "autoencoder.model.in_channels=1")
    assert "autoencoder.model.in_channels is 1, but the data has 3 (shard.channels)" in text
    assert load_pipeline_config(SMOKE, ["shard.channels=3", "autoencoder.model.in_channels=3"])  # agreeing is fine
    text = refusal("dit.model.num_classes=3")
    assert "dit.model.num_classes is 3, but the data has 10 (the classes of shard.source 'builtin:mnist')" in text
    three = image_folder(tmp_path / "three", ["a", "b", "c"])
    assert load_pipeline_config(SMOKE, [f"shard.source={three}", "dit.model.num_classes=3"])
    # ae-mnist: 4 latent channels, f=4 on the 16 px base
    assert "dit.model.in_channels is 8, but the data has 4 (the latent channels of autoencoder.preset" \
        in refusal("dit.model.in_channels=8")
    assert "dit.model.input_size is 8, but the data has 4 (autoencoder.image_size 16 / the autoencoder's f=4)" \
        in refusal("dit.model.input_size=8")
    assert "superres.0.model.in_channels is 1, but the data has 3 (shard.channels)" \
        in refusal("shard.channels=3", "superres.0.model.in_channels=1")
    assert "superres.0.model.num_classes is 10, but the data has 0 (superres.0.class_conditional is false)" \
        in refusal("superres.0.model.num_classes=10")
    assert "noisy_classifier.model.num_classes is 2" in refusal("noisy_classifier.preset=nc-tiny",
                                                                 "noisy_classifier.model.num_classes=2")
    # a class count only the shard step can know (inside tars, in S3) is left to the steps
    assert load_pipeline_config(SMOKE, [f"shard.source=webdataset:{tmp_path}", "dit.model.num_classes=3"])
