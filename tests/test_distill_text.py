"""Distilling a text-conditioned DiT (issue 17): the teacher called with its captions' encoding and guided
against its null caption, a TextDiT student whose joint encoder starts as the teacher's and trains with
it, its export with the tokenizer, sampling it with prompts, the step on Ray Train for both methods, and
the evaluate step's distill rows of a text student."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from components.common.train_loop import LocalSession, train_loop
from components.diffusion import NoiseSchedule, ddim_step, make_cfg_model_fn, spaced_timesteps
from components.distill.config import DistillConfig
from components.distill.consistency import consistency_levels
from components.distill.sample import generate_student
from components.distill.task import ConsistencyTask, ProgressiveTask
from components.dit.load import DitMeta
from components.dit.model import DIT_PRESETS, DiT
from components.dit.text_model import TextDiT, text_dit_arguments
from components.text.config import TextEncoderConfig
from components.text.load import TOKENIZER_FILE, build_text_encoder, tokenizer_from_captions
from rounding import assert_same_up_to_rounding
from test_dit import LATENT, tiny_autoencoder
from test_dit_text import captioned_latents
import metas

GUIDANCE = 1.5
TEXT = {"kind": "joint", "width": 32, "depth": 1, "heads": 2, "max_tokens": 8, "caption_dropout": 0.1}
PROMPTS = ["a thin zero", "a thick two"]

pytestmark = pytest.mark.usefixtures("one_thread")


def text_teacher(out, captions: list[str], classes: list[str]) -> tuple[DitMeta, str]:
    """A v-prediction text DiT (joint encoder over ``captions``' words) written as the DiT step writes
    it, weights perturbed so captions and guidance matter (its text entries start at zero):
    (dit.json's meta, the tokenizer JSON)."""
    cfg = TextEncoderConfig(**TEXT)
    tokenizer = tokenizer_from_captions(cfg, captions)
    encoder = build_text_encoder(cfg, tokenizer, "dit.text")
    torch.manual_seed(0)
    kwargs = {**DIT_PRESETS["DiT-Micro/2"], "input_size": LATENT[1], "in_channels": LATENT[0], "num_classes": None,
              "learn_sigma": False, "class_dropout_prob": 0.1, **text_dit_arguments(encoder)}
    model = TextDiT(DiT(**kwargs), encoder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out / "dit.safetensors"))
    (out / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
    meta = metas.dit_meta(model=kwargs, schedule="scaled_linear", num_timesteps=1000, prediction="v",
                          learn_sigma=False, num_classes=len(classes), null_label=None, latent_shape=list(LATENT),
                          classes=classes, image_channels=1, image_size=8, sampling={"guidance": GUIDANCE}, conditioning="text",
                          text=cfg.model_dump(mode="json"), grid_prompts=PROMPTS)
    (out / "dit.json").write_text(json.dumps(meta.to_json()))
    return meta, tokenizer.to_json()


def distill_cfg(method: str, **train) -> DistillConfig:
    train = {"max_steps": 20, "batch_size": 16, "lr": 1e-3, "ema_decay": 0.5, "log_every": 10,
             "checkpoint_every": 1000, **train}
    return DistillConfig(method=method, progressive={"start_steps": 4, "end_steps": 2},
                         consistency={"num_levels": 6, "sample_levels": [400]}, train=train)


def text_task(tmp_path, method: str, cfg: DistillConfig | None = None):
    """A progressive round (4 -> 2 steps) or a consistency run of the text teacher, on captioned latents
    in memory."""
    data = captioned_latents()
    meta, tokenizer_json = text_teacher(tmp_path / "dit", data[2], ["zero", "one", "two"])
    cfg = cfg or distill_cfg(method)
    facts = {"method": method, "guidance": GUIDANCE, "teacher_cfg_weight": GUIDANCE}
    ref = (str(tmp_path / "dit"), "dit.safetensors")
    if method == "progressive":
        levels = spaced_timesteps(1000, 4, "trailing")
        meta = metas.student_meta(meta, **facts, teacher_levels=levels.tolist(), levels=levels[::2].tolist(),
                                  native_steps=2)
        return ProgressiveTask(cfg, meta.to_json(), init=ref, teacher=ref, in_memory=data,
                               tokenizer_json=tokenizer_json)
    levels = consistency_levels(NoiseSchedule.from_name("scaled_linear", 1000), cfg.consistency.num_levels)
    meta = metas.student_meta(meta, **facts, consistency_levels=levels.tolist(), native_steps=1,
                              sample_levels=[int(levels[len(levels) // 2])])
    return ConsistencyTask(cfg, meta.to_json(), init=ref, teacher=ref, in_memory=data, tokenizer_json=tokenizer_json)


# ---------------------------------------------------------------- the teacher: its captions, its null caption


def test_the_progressive_target_is_the_text_teacher_guided_against_its_null_caption(tmp_path):
    task = text_task(tmp_path, "progressive")
    teacher = task.build_model().eval()  # the student starts as the teacher: the same weights, encoder included
    assert isinstance(teacher, TextDiT) and any(k.startswith("text_encoder.") for k in teacher.state_dict())
    captions = ["a thin zero", "a thick two", "a thin one", "a thin zero"]
    x0 = captioned_latents(4)[0]
    schedule, (t, t_mid) = task.schedule, task.meta["teacher_levels"][:2]
    t_end = task.meta["teacher_levels"][2]
    z_t = (schedule.alphas_cumprod[t].sqrt() * x0 + (1 - schedule.alphas_cumprod[t]).sqrt() * torch.randn_like(x0)).float()
    with torch.no_grad():  # brute force: DDIM twice with the teacher as the DiT's sampling guides it
        text = teacher.encode(captions).extra_args()
        guided = make_cfg_model_fn(lambda x, tt, y, **c: teacher(x, tt, y, **c), None, GUIDANCE,
                                   null_text=teacher.null_text())
        z_mid, _ = ddim_step(schedule, guided(z_t, torch.full((4,), t), None, **text), z_t, t, t_mid, prediction="v")
        z_end, _ = ddim_step(schedule, guided(z_mid, torch.full((4,), t_mid), None, **text), z_mid, t_mid, t_end,
                             prediction="v")
    full = lambda v: torch.full((4,), v)  # noqa: E731
    target = task.teacher_target(z_t, None, full(t), full(t_mid), full(t_end), torch.float32, captions)
    one_step, _ = ddim_step(schedule, target, z_t, t, t_end, prediction="x0")
    torch.testing.assert_close(one_step, z_end, atol=2e-4, rtol=1e-4)
    # the caption decides the target: the same z_t under another caption is another target
    other = task.teacher_target(z_t, None, full(t), full(t_mid), full(t_end), torch.float32, ["a thick two"] * 4)
    assert not torch.allclose(other[0], target[0], atol=1e-4) and torch.allclose(other[1], target[1], atol=1e-5)


def test_a_class_student_refuses_prompts_and_a_text_student_wants_them(tmp_path):
    task = text_task(tmp_path, "progressive")
    student, meta = task.build_model().eval(), json.loads(json.dumps(task.meta))
    ae, ae_meta = tiny_autoencoder()
    with pytest.raises(ValueError, match="distilled from a text-conditioned DiT: it samples from prompts"):
        generate_student(student, meta, ae, ae_meta, [0, 1])
    class_meta = {k: v for k, v in meta.items() if k not in ("text", "conditioning")}
    with pytest.raises(ValueError, match="class-conditional DiT: it takes labels, not prompts"):
        generate_student(student, class_meta, ae, ae_meta, None, prompts=PROMPTS)


# ---------------------------------------------------------------- the step: Ray Train, both methods


def captioned_inputs(tmp_path) -> dict:
    """shard (120 digits at 8 px, captioned from their attributes), an untrained autoencoder, its
    latents (with the captions), and a text DiT over the training captions' words, as manifests."""
    from components.common.data import latent_split, split_captions
    from components.common.step import FileRecord, Manifest
    from components.common.storage import Storage
    from components.latents.config import LatentsConfig
    from components.latents.run import run as encode_latents
    from components.shard.config import ShardConfig
    from components.shard.run import run as shard
    from test_dit import manifest_from, step_ctx, untrained_autoencoder_manifest

    ctx = step_ctx(tmp_path, "shard")
    shard_manifest = manifest_from(shard(ShardConfig(max_samples=120, image_size=8, samples_per_shard=60,
                                                     val_fraction=0.2, captions="attributes"), {}, ctx), ctx)
    classes = shard_manifest.info["classes"]
    ae_manifest = untrained_autoencoder_manifest(tmp_path, classes)
    ctx = step_ctx(tmp_path, "latents")
    latents = manifest_from(encode_latents(LatentsConfig(batch_size=64), {"shard": shard_manifest,
                                                                            "autoencoder": ae_manifest}, ctx), ctx)
    meta, _ = text_teacher(tmp_path / "dit", list(split_captions(latent_split(latents, "train", captions=True))),
                           classes)
    storage = Storage.from_uri(str(tmp_path / "dit"))
    files = [FileRecord(p, storage.sha256(p), storage.size(p)) for p in ("dit.safetensors", "dit.json", TOKENIZER_FILE)]
    dit = Manifest(step="dit", cache_key="k", code_version="1", location=str(tmp_path / "dit"), config={},
                   upstream={}, files=files, info=meta.to_json())
    return {"shard": shard_manifest, "autoencoder": ae_manifest, "latents": latents, "dit": dit}


@pytest.fixture(scope="module")
def captioned(ray_cluster, tmp_path_factory) -> dict:
    return captioned_inputs(tmp_path_factory.mktemp("captioned"))


@pytest.mark.integration
# progressive: through the whole smoke-text workflow (tests/test_pipeline_text.py), its round's tokenizer too
@pytest.mark.parametrize("method", ["consistency_distillation"])
def test_the_step_distills_a_text_dit_and_its_student_samples_prompts(captioned, tmp_path, monkeypatch, method):
    from pathlib import Path

    from components.distill.load import load_student
    from components.distill.train import run as distill
    from test_dit import manifest_from, step_ctx

    inputs, teacher_dir = captioned, Path(captioned["dit"].location)
    cfg = distill_cfg(method, max_steps=2, batch_size=16, log_every=1, zero_stage=2).model_copy(
        update={"grid_per_label": 2})
    ctx = step_ctx(tmp_path, "distill")  # one worker: the two-worker path is test_distill.py's
    ctx = dataclasses.replace(ctx, resources=ctx.resources.model_copy(update={"num_workers": 1}))
    out = distill(cfg, {k: inputs[k] for k in ("dit", "autoencoder", "latents")}, ctx)
    assert TOKENIZER_FILE in out.files and "samples.png" in out.files and out.metrics["native_steps"] >= 1
    if method == "progressive":  # one round, 4 -> 2 steps; its folder holds the tokenizer too, hashed
        assert json.loads(ctx.output.read_text("round_1/round.json"))["files"].keys() >= {TOKENIZER_FILE}
    assert ctx.output.read_bytes(TOKENIZER_FILE) == (teacher_dir / TOKENIZER_FILE).read_bytes()
    import io

    from PIL import Image

    grid = Image.open(io.BytesIO(ctx.output.read_bytes("samples.png")))
    assert grid.size[1] == len(PROMPTS) * 8 + (len(PROMPTS) + 1) * 2  # a row per grid prompt of the DiT

    student, meta = load_student(manifest_from(out, ctx))  # through the manifest: every file's sha256 checked
    assert isinstance(student, TextDiT) and meta["conditioning"] == "text" and meta["method"] == method
    teacher = load_file(str(teacher_dir / "dit.safetensors"))
    assert not torch.equal(student.state_dict()["text_encoder.token_embedding.weight"],
                           teacher["text_encoder.token_embedding.weight"])  # the encoder trained with the student
    ae, ae_meta = tiny_autoencoder()
    prompts = ["a thin zero", "a thick seven leaning right", "a thin zero"]
    images = generate_student(student, meta, ae, ae_meta, None, prompts=prompts, seed=3)
    assert images.shape == (3, 1, 8, 8)
    same_seed_other_prompt = generate_student(student, meta, ae, ae_meta, None, prompts=[prompts[1]] * 3, seed=3)
    assert not torch.equal(images[0], same_seed_other_prompt[0]) and torch.equal(images[1], same_seed_other_prompt[1])
    assert_same_up_to_rounding(images, generate_student(student, meta, ae, ae_meta, None, prompts=prompts, seed=3,
                                                        batch_size=1))
    assert not torch.equal(images, generate_student(student, meta, ae, ae_meta, None, prompts=prompts, seed=4))
    if method != "progressive":
        evaluate_rows_of_a_text_student(inputs, manifest_from(out, ctx), monkeypatch)


def evaluate_rows_of_a_text_student(inputs: dict, distill_manifest, monkeypatch) -> None:
    """The evaluate step's quality-versus-steps rows: the teacher and the student draw from the prompts the
    step gives the text DiT (validation captions of each class), each image judged as its prompt's class."""
    import numpy as np

    from components.evaluate.classifier import EvalClassifier
    from components.evaluate.config import EvaluateConfig
    from components.evaluate.distill_table import quality_table
    from components.evaluate.metrics import RunningMoments
    from components.evaluate.prompts import prompts_per_class

    classes = inputs["shard"].info["classes"]
    cfg = EvaluateConfig(samples_per_class=2, teacher_steps=[2], batch_size=64, sample={"steps": 2, "guidance": 1.0})
    torch.manual_seed(0)
    judge = EvalClassifier(1, len(classes), widths=(4,), feature_dim=4).eval()
    moments = RunningMoments(4)
    moments.update(np.random.default_rng(0).normal(size=(16, 4)))
    seen = []
    import components.distill.sample as student_sampling

    real = student_sampling.generate_student

    def recording(*args, prompts=None, **kwargs):  # the real sampler, its prompts kept
        seen.append(prompts)
        return real(*args, prompts=prompts, **kwargs)

    monkeypatch.setattr(student_sampling, "generate_student", recording)
    rows, metrics = quality_table(cfg, {**inputs, "distill": distill_manifest}, judge, moments, len(classes), "cpu")
    assert [(row["sampler"].split(" ")[0], row["steps"], row["images"]) for row in rows] == \
        [("teacher", 2, 2 * len(classes)), ("student", 1, 2 * len(classes)), ("student", 2, 2 * len(classes))]
    assert seen == [prompts_per_class(inputs["shard"], classes, 2)] * 2
    assert all(np.isfinite(metrics[f"student_{k}step_frechet_distance"]) for k in (1, 2))


# ---------------------------------------------------------------- the config: distill takes a text DiT


def test_a_text_dit_loads_with_distill_and_evaluate_but_not_with_classifier_guidance():
    from pathlib import Path

    from components.common.config import ConfigError
    from pipelines.config import load_pipeline_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "mnist-text.yaml"
    for method in ("progressive", "consistency_distillation"):
        cfg = load_pipeline_config(recipe, [f"distill.method={method}"])
        assert cfg.dit.uses_text and cfg.distill.method == method and cfg.evaluate is not None
    with pytest.raises(ConfigError, match="noisy_classifier sample.s. the DiT by class label and take no prompts"):
        load_pipeline_config(recipe, ["distill.method=progressive", "noisy_classifier.t_buckets=2"])
    with pytest.raises(ConfigError, match="dit.conditioning: text needs captions in the shards"):
        load_pipeline_config(recipe, ["distill.method=progressive", "shard.captions=none"])
