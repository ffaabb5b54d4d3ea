"""Typed stage metadata writes the JSON the dict version wrote, reads back what it wrote (unknown keys
included), and refuses a file without a key its step always writes, naming the file and the key."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import typing
from pathlib import Path

import pytest
import torch

import metas
from components.autoencoder.load import AE_META, AutoencoderMeta, load_autoencoder
from components.common.stage_meta import MissingMetaKey, StageMeta
from components.common.step import FileRecord, Manifest
from components.distill.load import STUDENT_META, StudentMeta, load_student
from components.distill.sample import supported_steps
from components.distill.train import consistency_student_meta, round_student_meta
from components.dit.config import DitConfig
from components.dit.load import DIT_META, DitMeta, load_dit, load_dit_meta
from components.dit.task import LatentDitTask
from components.dit.text_setup import TextSetup
from components.dit.train import build_step_dit, step_meta
from components.evaluate.load import CLASSIFIER_META, ClassifierMeta
from components.noisy_classifier.load import META as NOISY_META, NoisyClassifierMeta
from components.superres.config import SuperResConfig
from components.superres.load import SR_META, SuperResMeta, load_superres
from components.superres.task import SuperResTask
from components.superres.train import build_step_superres
from conftest import REPO

CLASSIFIER_JSON = {"preset": "cnn-tiny", "in_channels": 1, "num_classes": 2, "classes": ["a", "b"], "image_size": 8,
                   "val_accuracy": 0.5, "input_range": "uint8 / 127.5 - 1", "train": {"steps": 3}}
NOISY_JSON = {"preset": "nc-tiny", "model": {"channels": 16}, "schedule": "linear", "num_timesteps": 1000,
              "classes": ["a", "b"], "latent_shape": [4, 8, 8], "parameters": 123}
# autoencoder.json as the step writes it (KL), and as files from before VQ and the SR stages were
AE_JSON = metas.ae_meta(model={"ch": 32}, scale_factor=0.71, classes=["a", "b"], regularizer="kl",
                        shard_image_size=16).to_json()
OLDER_AE_JSON = {k: v for k, v in AE_JSON.items() if k not in ("regularizer", "shard_image_size")}
LATENT = [4, 4, 4]
GRID_PROMPTS = ["a thin one", "a bold two"]
WARM = {"warm_start": "models:/dit@champion", "warm_start_version": "dit/3", "warm_start_source": "s3://b/steps/dit/k"}
# every key dit.json has, whatever the run: what step_meta wrote as a dict
DIT_KEYS = {"preset", "model", "schedule", "num_timesteps", "prediction", "learn_sigma", "num_classes", "null_label",
            "latent_shape", "classes", "image_channels", "image_size", "flops_per_image", "parameters", "data",
            "max_steps", "ema_decay", "sampling"}
TEXT_KEYS = {"conditioning", "text", "text_vocabulary", "grid_prompts"}


def dit_step_meta(text: bool = False, warm: dict | None = None) -> DitMeta:
    """dit.json as the DiT step builds it (``step_meta``) for a DiT-Micro/2 on 4x4x4 latents."""
    if not text:
        cfg = DitConfig(preset="DiT-Micro/2", train={"max_steps": 3})
        probe = build_step_dit(cfg, LATENT, 3)
        return step_meta(cfg, probe, 3, LATENT, ["a", "b", "c"], metas.ae_meta(), None, warm)
    cfg = DitConfig(preset="DiT-Micro/2", conditioning="text", train={"max_steps": 3})
    setup = TextSetup(tokenizer_json=None, arguments={"context_dim": 32, "pooled_dim": 32},
                      grid_prompts=GRID_PROMPTS, vocabulary=17)
    probe = build_step_dit(cfg, LATENT, None, setup.arguments)
    return step_meta(cfg, probe, 1, LATENT, None, metas.ae_meta(), setup, warm)


def sr_step_meta() -> SuperResMeta:
    cfg = SuperResConfig(input_size=8, output_size=16, preset="sr-tiny")
    probe = build_step_superres(cfg, channels=1, num_classes=0)
    return SuperResMeta(preset=cfg.preset, model=probe.arguments, input_size=8, output_size=16, channels=1,
                        schedule=cfg.schedule, num_timesteps=cfg.num_timesteps, filter=cfg.filter, num_classes=0,
                        classes=None, prediction=cfg.prediction, sampling=cfg.sample.model_dump(mode="json"),
                        augmentation=cfg.augmentation.model_dump(mode="json"),
                        parameters=sum(p.numel() for p in probe.parameters()), max_steps=cfg.train.max_steps)


FACTS = {"method": "progressive", "guidance": 1.5, "spacing": "trailing", "distill": {"seed": 0}}


def progressive_meta(k: int = 1) -> StudentMeta:
    return round_student_meta(dit_step_meta(), FACTS, k, 8, [999, 874, 749, 624, 499, 374, 249, 124],
                              [999, 749, 499, 249])


def consistency_meta(distilling: bool) -> StudentMeta:
    facts = {**FACTS, "method": "consistency_distillation" if distilling else "consistency_training"}
    return consistency_student_meta(dit_step_meta(), facts, distilling, [0, 100, 400, 999], [400])


def written() -> list[tuple[type[StageMeta], dict, str]]:
    """(class, the JSON its writer builds, file name) for every typed stage meta."""
    return [(DitMeta, dit_step_meta().to_json(), DIT_META), (DitMeta, dit_step_meta(True, WARM).to_json(), DIT_META),
            (AutoencoderMeta, AE_JSON, AE_META), (SuperResMeta, sr_step_meta().to_json(), SR_META),
            (StudentMeta, progressive_meta(2).to_json(), STUDENT_META),
            (StudentMeta, consistency_meta(True).to_json(), STUDENT_META),
            (ClassifierMeta, CLASSIFIER_JSON, CLASSIFIER_META), (NoisyClassifierMeta, NOISY_JSON, NOISY_META)]


IDS = ["dit", "dit-text-warm", "autoencoder", "superres", "progressive", "consistency", "classifier", "noisy"]


@pytest.mark.parametrize("meta_class,data,name", written(), ids=IDS)
def test_a_round_trip_gives_the_same_file_unknown_keys_included(meta_class, data, name, tmp_path):
    text = json.dumps(data, indent=2, sort_keys=True)  # what the step writes
    (tmp_path / name).write_text(text)
    meta = meta_class.read(str(tmp_path), name)
    assert type(meta) is meta_class and meta.extra == {}
    assert json.dumps(meta.to_json(), indent=2, sort_keys=True) == text
    newer = {**data, "written_by_newer_code": [1, 2]}
    kept = meta_class.from_json(newer)
    assert kept.to_json() == newer and kept.extra == {"written_by_newer_code": [1, 2]}
    assert kept["classes"] == kept.classes and kept.get("absent", 7) == 7 and "written_by_newer_code" in kept
    assert kept != meta and meta_class.from_json(json.loads(text)) == meta


@pytest.mark.parametrize("meta_class,data,name", written(), ids=IDS)
def test_a_missing_key_is_named_with_the_file(meta_class, data, name, tmp_path):
    key = meta_class.required_names()[-1]
    (tmp_path / name).write_text(json.dumps({k: v for k, v in data.items() if k not in (key, "preset")}))
    with pytest.raises(MissingMetaKey) as raised:
        meta_class.read(str(tmp_path), name)
    assert str(tmp_path / name) in str(raised.value) and repr(key) in str(raised.value)
    assert raised.value.keys == ["preset", key] and isinstance(raised.value, ValueError)
    (tmp_path / name).write_text("{not json")
    with pytest.raises(ValueError, match=f"{name}: not valid JSON"):
        meta_class.read(str(tmp_path), name)


def test_dit_json_has_the_text_entries_only_for_a_text_dit():
    plain, text = dit_step_meta().to_json(), dit_step_meta(text=True).to_json()
    assert set(plain) == DIT_KEYS and set(text) == DIT_KEYS | TEXT_KEYS
    assert text["conditioning"] == "text" and text["text_vocabulary"] == 17 and text["grid_prompts"] == GRID_PROMPTS
    assert text["null_label"] is None and plain["null_label"] == 3 and plain["classes"] == ["a", "b", "c"]
    assert DitMeta.from_json(text).uses_text and not DitMeta.from_json(plain).uses_text
    assert set(dit_step_meta(warm=WARM).to_json()) == DIT_KEYS | set(WARM)
    older = {k: v for k, v in plain.items() if k != "sampling"}  # sampling: read from the step's config instead
    assert DitMeta.from_json(older).sampling is None and DitMeta.from_json(older).to_json() == older


def test_the_dit_task_exports_dit_json_and_load_dit_returns_it_typed(tmp_path):
    meta = dit_step_meta()
    cfg = DitConfig(preset="DiT-Micro/2")
    task = LatentDitTask(cfg, meta.model, meta.to_json())
    model = task.build_model()
    task.export(model, model, tmp_path)
    assert (tmp_path / DIT_META).read_text() == json.dumps(meta.to_json(), indent=2, sort_keys=True)
    loaded, loaded_meta = load_dit(str(tmp_path))
    assert loaded_meta == meta == load_dit_meta(str(tmp_path)) and loaded_meta.class_names() == ["a", "b", "c"]


def test_an_older_autoencoder_file_reads_as_kl_and_stays_as_it_was(tmp_path):
    from tests.test_dit import untrained_autoencoder_manifest

    manifest = untrained_autoencoder_manifest(tmp_path, ["a", "b"])  # its autoencoder.json has no regularizer
    written_json = json.loads(manifest.storage().read_text(AE_META))
    model, meta = load_autoencoder(manifest)
    assert isinstance(meta, AutoencoderMeta) and meta.regularizer is None and meta.kind == "kl"
    assert meta.to_json() == written_json and "regularizer" not in meta.to_json()
    assert AutoencoderMeta.from_json(OLDER_AE_JSON).to_json() == OLDER_AE_JSON
    vq = AutoencoderMeta.from_json({**AE_JSON, "regularizer": "vq", "scale_from": "pre_quantization"})
    assert vq.kind == "vq" and vq.shard_image_size == 16


def test_the_superres_task_exports_superres_json_and_load_superres_returns_it_typed(tmp_path):
    meta = sr_step_meta()
    cfg = SuperResConfig(input_size=8, output_size=16, preset="sr-tiny")
    task = SuperResTask(cfg, meta.model, meta.to_json())
    model = task.build_model()
    task.export(model, model, tmp_path)
    stage = load_superres(str(tmp_path), steps=3)
    assert stage.meta == meta and stage.sampling.steps == 3 and stage.sampling.spacing == meta.sampling["spacing"]


def test_students_keep_the_dicts_the_step_wrote_and_load_typed(tmp_path):
    teacher = dit_step_meta().to_json()
    levels = {"teacher_levels": [999, 874, 749, 624, 499, 374, 249, 124], "levels": [999, 749, 499, 249]}
    for k, weight in ((1, 1.5), (2, 0.0)):  # the dict distill wrote for round k
        old = {**teacher, **FACTS, "round": k, "teacher_steps": 8, "native_steps": 4, **levels,
               "teacher_cfg_weight": weight}
        assert progressive_meta(k).to_json() == old
    for distilling, guidance in ((True, 1.5), (False, 0.0)):
        method = "consistency_distillation" if distilling else "consistency_training"
        old = {**teacher, **FACTS, "method": method, "guidance": guidance, "native_steps": 1,
               "consistency_levels": [0, 100, 400, 999], "sample_levels": [400], "teacher_cfg_weight": guidance}
        assert consistency_meta(distilling).to_json() == old
    assert supported_steps(progressive_meta()) == [4] and supported_steps(consistency_meta(True).to_json()) == [1, 2]

    meta = progressive_meta()
    (tmp_path / STUDENT_META).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True))
    from safetensors.torch import save_file

    from components.dit.model import DiT

    save_file(DiT(**meta.model).state_dict(), str(tmp_path / "distill.safetensors"))
    _, loaded = load_student(str(tmp_path))
    assert loaded == meta and isinstance(loaded, DitMeta) and loaded.levels == levels["levels"]


def test_of_takes_the_typed_meta_or_its_json_form():
    meta = dit_step_meta()
    assert DitMeta.of(meta) is meta and DitMeta.of(meta.to_json()) == meta
    student = progressive_meta()
    assert DitMeta.of(student) is student  # a student is a DiT
    with pytest.raises(MissingMetaKey, match="'method'"):
        StudentMeta.of(meta)  # a DiT is not a student


# ---------------------------------------------------------------- every stage's loader returns a typed meta


def type_checking_names(module) -> dict[str, object]:
    """The names a module imports under ``if TYPE_CHECKING:``, imported now, to resolve its annotations."""
    names: dict[str, object] = {}
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for imported in node.body:
                if isinstance(imported, ast.ImportFrom):
                    source = importlib.import_module(imported.module)
                    names |= {a.asname or a.name: getattr(source, a.name) for a in imported.names}
                elif isinstance(imported, ast.Import):
                    names |= {a.name.split(".")[0]: importlib.import_module(a.name.split(".")[0])
                              for a in imported.names}
    return names


def returned_meta(function) -> type | None:
    """The meta class a loader returns: the last of its (model, meta) tuple, or the ``meta`` field of
    the stage object it returns; None if it returns no model."""
    module = inspect.getmodule(function)
    names = {**vars(module), **type_checking_names(module)}
    returned = typing.get_type_hints(function, names)["return"]
    if typing.get_origin(returned) is tuple:
        first = typing.get_args(returned)[0]
        first = eval(first, names) if isinstance(first, str) else first  # noqa: S307 - our own annotation
        models = typing.get_args(first) or (first,)  # a union of model classes, or one
        return typing.get_args(returned)[-1] if all(issubclass(m, torch.nn.Module) for m in models) else None
    if dataclasses.is_dataclass(returned) and {"model", "meta"} <= {f.name for f in dataclasses.fields(returned)}:
        owner = inspect.getmodule(returned)
        return typing.get_type_hints(returned, {**vars(owner), **type_checking_names(owner)})["meta"]
    return None


def test_every_stage_loader_that_returns_a_model_returns_a_stage_meta():
    found = {}
    for path in sorted((REPO / "components").glob("*/load.py")):
        module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("load_") and function.__module__ == module.__name__:
                meta = returned_meta(function)
                if meta is not None:
                    found[name] = meta
    assert set(found) >= {"load_dit", "load_autoencoder", "load_superres", "load_student", "load_classifier",
                          "load_noisy_classifier"}, found
    for name, meta in found.items():
        assert isinstance(meta, type) and issubclass(meta, StageMeta) and meta is not StageMeta, (name, meta)


def test_the_missing_key_error_reaches_the_loader(tmp_path):
    data = dit_step_meta().to_json()
    del data["schedule"]
    Path(tmp_path / DIT_META).write_text(json.dumps(data))
    with pytest.raises(MissingMetaKey, match=rf"{tmp_path / DIT_META}: missing key 'schedule'"):
        load_dit(str(tmp_path))  # before it reads any weights: none were written


def test_a_frozen_encoders_file_digests_are_a_dit_meta_field_written_only_when_recorded():
    cfg = DitConfig(preset="DiT-Micro/2", conditioning="text", train={"max_steps": 3})
    digests = {"config.json": "0" * 64, "model.safetensors": "1" * 64}
    setup = TextSetup(tokenizer_json=None, arguments={"context_dim": 32, "pooled_dim": 32},
                      grid_prompts=GRID_PROMPTS, vocabulary=0, encoder_files=digests)
    probe = build_step_dit(cfg, LATENT, None, setup.arguments)
    frozen = step_meta(cfg, probe, 1, LATENT, None, metas.ae_meta(), setup).to_json()
    assert frozen["text_encoder_files"] == digests and set(frozen) == DIT_KEYS | TEXT_KEYS | {"text_encoder_files"}
    read = DitMeta.from_json(frozen)
    assert read.text_encoder_files == digests and read.extra == {} and read.to_json() == frozen
    assert "text_encoder_files" not in dit_step_meta(text=True).to_json()  # a joint encoder records none


def test_controlnet_json_reads_typed_with_its_dits_facts_and_keeps_what_the_step_wrote():
    from components.controlnet.config import ControlNetConfig
    from components.controlnet.load import ControlNetMeta
    from components.controlnet.train import DIT_FACTS, checked_dit_meta
    from components.controlnet.train import step_meta as controlnet_step_meta
    from components.dit.load import SamplingFacts, sampling_meta

    dit = dit_step_meta()
    manifest = Manifest(step="dit", cache_key="k", code_version="1", location="/nowhere", config={}, upstream={},
                        files=[FileRecord("dit.safetensors", "a" * 64, 1)])
    cfg = ControlNetConfig(control="blur", num_blocks=1)
    written = controlnet_step_meta(cfg, manifest, checked_dit_meta(dit, cfg)) | {"parameters": 5, "dit_parameters": 9}
    meta = ControlNetMeta.from_json(json.loads(json.dumps(written)))
    assert meta.to_json() == written and list(meta.to_json()) == list(written) and meta.extra == {}
    assert meta.blur_sigma == cfg.blur_sigma and meta.edge_threshold is None and meta.dit_weights_sha256 == "a" * 64
    assert [getattr(meta, k) for k in DIT_FACTS] == [getattr(dit, k) for k in DIT_FACTS]
    assert isinstance(sampling_meta(written), SamplingFacts) and isinstance(sampling_meta(dit.to_json()), DitMeta)
    with pytest.raises(MissingMetaKey, match="'latent_shape'"):
        sampling_meta({k: v for k, v in written.items() if k != "latent_shape"})
    with pytest.raises(ValueError, match="text-conditioned"):
        checked_dit_meta(dit_step_meta(text=True), cfg)
