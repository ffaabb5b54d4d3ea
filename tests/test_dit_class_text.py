"""A class+text DiT (``dit.conditioning: class+text``) through its task in one process: label and caption
in every batch, dropped together by one draw per sample; it learns, exports, loads and samples with one
label and one prompt per image, each of which changes the image; ``latentflow sample --labels --prompt``
draws each prompt under each label; the served generator takes both columns; and the refusals."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import metas

from components.common.config import ConfigError
from components.common.step import FileRecord, Manifest
from components.common.storage import Storage
from components.common.train_loop import LocalSession, train_loop
from components.dit.config import DitConfig, SamplingConfig, meta_uses_classes, meta_uses_text
from components.dit.generate import generate
from components.dit.load import DIT_META, DIT_WEIGHTS, load_dit
from components.dit.task import LatentDitTask, grid_conditions
from components.dit.text_model import TextDiT, text_dit_arguments
from components.dit.train import build_step_dit
from components.evaluate.prompts import grid_prompts
from components.serving.generator import Generator, LatentflowGenerator, png
from components.serving.log import generator_example, generator_signature
from components.text.load import TOKENIZER_FILE, build_text_encoder, tokenizer_from_captions
from pipelines.sample import BadFlag
from pipelines.sample_prompts import sample_prompts
from test_dit import CLASSES, LATENT, tiny_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")
STYLES = ("thin", "thick")  # the caption's word: a pattern of its own, independent of the class
SAMPLING = SamplingConfig(steps=4, guidance=2.0, seed=0)


def labelled_captioned_latents(n: int = 96, seed: int = 0):
    """Latents = the class's pattern + the caption's style pattern: both the label and the caption matter."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    styles = (torch.arange(n) // len(CLASSES)) % len(STYLES)
    class_patterns = torch.randn(len(CLASSES), *LATENT, generator=g)
    style_patterns = torch.randn(len(STYLES), *LATENT, generator=g)
    latents = class_patterns[labels] + style_patterns[styles] + 0.3 * torch.randn(n, *LATENT, generator=g)
    return latents, labels, [f"a {STYLES[int(s)]} digit" for s in styles]


def class_text_cfg(**overrides) -> DitConfig:
    train = {"max_steps": 30, "batch_size": 16, "lr": 2e-3, "ema_decay": 0.5, "log_every": 10,
             "checkpoint_every": 1000, **overrides.pop("train", {})}
    return DitConfig(preset="DiT-Micro/2", conditioning="class+text", train=train,
                     text={"width": 32, "depth": 1, "heads": 2, "max_tokens": 8, "caption_dropout": 0.2}, **overrides)


class RecordingTask(LatentDitTask):
    def loss(self, model, batch, step, generator):
        loss, extras = super().loss(model, batch, step, generator)
        self.record.append(float(loss.detach()))
        return loss, extras


def class_text_task(cfg: DitConfig, data) -> RecordingTask:
    tokenizer = tokenizer_from_captions(cfg.text, data[2])
    arguments = text_dit_arguments(build_text_encoder(cfg.text, tokenizer))
    kwargs = build_step_dit(cfg, LATENT, len(CLASSES), arguments).arguments
    meta = metas.dit_meta(schedule=cfg.schedule, num_timesteps=cfg.num_timesteps, prediction=cfg.prediction,
                          learn_sigma=False, num_classes=len(CLASSES), null_label=len(CLASSES),
                          latent_shape=list(LATENT), classes=CLASSES, model=kwargs,
                          text=cfg.text.model_dump(mode="json"), conditioning="class+text",
                          sampling=SAMPLING.model_dump(), grid_prompts=["a thin digit"], grid_labels=[2])
    task = RecordingTask(cfg, kwargs, meta.to_json(), in_memory=data, tokenizer_json=tokenizer.to_json())
    task.record = []
    return task


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(export directory, step losses) of a class+text DiT trained 30 steps in one process."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture: tiny models on a busy machine
    try:
        cfg = class_text_cfg()
        task = class_text_task(cfg, labelled_captioned_latents())
        root = tmp_path_factory.mktemp("class_text")
        assert train_loop(task, cfg.train, LocalSession(root / "ckpt"), None)["step"] == 30
        yield sorted((root / "ckpt").iterdir())[-1] / "export", task.record
    finally:
        torch.set_num_threads(saved)


def test_the_config_takes_both_and_keeps_class_keys():
    cfg = class_text_cfg()
    assert cfg.uses_classes and cfg.uses_text
    assert DitConfig(conditioning="text").uses_text and not DitConfig(conditioning="text").uses_classes
    assert "conditioning" not in DitConfig().cache_relevant()  # class DiTs keep their cache keys
    assert cfg.cache_relevant()["conditioning"] == "class+text"
    with pytest.raises(ValueError, match="dit.grid_prompts: a class\\+text DiT .* class is unknown"):
        class_text_cfg(grid_prompts=["a thin digit"])
    with pytest.raises(ValueError, match="dit.class_dropout_prob: 0.3 differs from dit.text.caption_dropout 0.2"):
        class_text_cfg(class_dropout_prob=0.3)
    assert class_text_cfg(class_dropout_prob=0.2).class_dropout_prob == 0.2  # the same rate: nothing to refuse


def test_label_and_caption_are_dropped_together_at_the_caption_rate():
    cfg = class_text_cfg()
    data = labelled_captioned_latents()
    task = class_text_task(cfg, data)
    model = task.build_model()
    assert isinstance(model, TextDiT) and model.dit.y_embedder is not None and model.dit.pooled_embedder is not None
    seen = []
    real_forward = model.forward

    def recording(x, t, y, force_drop_ids=None, captions=None, **kwargs):
        seen.extend(zip(force_drop_ids.tolist(), captions, y.tolist()))
        return real_forward(x, t, y, force_drop_ids=force_drop_ids, captions=captions, **kwargs)

    model.forward = recording
    generator = torch.Generator().manual_seed(0)
    for step in range(12):
        rows = slice(16 * (step % 6), 16 * (step % 6 + 1))
        task.loss(model, {"latent": data[0][rows], "label": data[1][rows], "caption": data[2][rows]}, step, generator)
    assert all((drop == 1) == (caption == "") for drop, caption, _ in seen)  # one draw: both or neither
    dropped = sum(drop for drop, _, _ in seen) / len(seen)
    assert 0.1 < dropped < 0.3  # caption_dropout 0.2, one draw per sample
    assert {label for _, _, label in seen} == {0, 1, 2}  # the real labels reach the model (nulled by force_drop_ids)


def test_it_learns_exports_and_both_label_and_prompt_change_the_image(trained):
    export, losses = trained
    assert statistics.mean(losses[-6:]) < 0.7 * statistics.mean(losses[:6])
    meta = json.loads((export / DIT_META).read_text())
    assert meta["conditioning"] == "class+text" and meta_uses_classes(meta) and meta_uses_text(meta)
    dit, meta = load_dit(str(export))
    assert isinstance(dit, TextDiT) and dit.null_class_id == len(CLASSES)
    ae, ae_meta = tiny_autoencoder()
    images = generate(dit, meta, ae, ae_meta, [0, 0, 2], SAMPLING, prompts=["a thin digit"] * 3)
    other_label = generate(dit, meta, ae, ae_meta, [2, 2, 2], SAMPLING, prompts=["a thin digit"] * 3)
    other_prompt = generate(dit, meta, ae, ae_meta, [0, 0, 2], SAMPLING, prompts=["a thick digit"] * 3)
    assert torch.equal(images[2], other_label[2])  # same label, prompt and seed index: the same image
    assert not torch.equal(images[0], other_label[0])  # the label changes it
    assert not torch.equal(images[0], other_prompt[0])  # and so does the prompt
    with pytest.raises(ValueError, match="2 labels but 3 prompts: a class\\+text DiT takes one of each"):
        generate(dit, meta, ae, ae_meta, [0, 1], SAMPLING, prompts=["a thin digit"] * 3)
    unguided = SAMPLING.model_copy(update={"guidance": 0.0})
    assert not torch.equal(images[0], generate(dit, meta, ae, ae_meta, [0], unguided, prompts=["a thin digit"])[0])


def test_grids_draw_each_prompt_under_its_own_label():
    labels, prompts, rows = grid_conditions(class_text_cfg(grid_per_label=2), 3, ["a", "b"], [2, 0])
    assert (labels, prompts, rows) == ([2, 2, 0, 0], ["a", "a", "b", "b"], [0, 0, 1, 1])
    # evaluate: prompts_per_class is class-major; each grid row keeps its prompt's class
    assert grid_prompts(["z0", "z1", "o0", "o1"], 2) == [("z0", 0), ("o0", 1), ("z1", 0), ("o1", 1)]


def write_workflow(root: Path, export: Path) -> None:
    """The trained export as a finished workflow's dit step (and an autoencoder step) with its summary."""
    from safetensors.torch import save

    from components.autoencoder.load import AE_META, AE_WEIGHTS
    from components.autoencoder.model import AUTOENCODER_PRESETS

    ae, ae_meta = tiny_autoencoder()
    ae_meta = dataclasses.replace(ae_meta, preset="ae-tiny", model={**AUTOENCODER_PRESETS["ae-tiny"], "in_channels": 1},
                                  downsample_factor=2, latent_channels=4, image_format="png", scale_from="none")
    records = []
    dit_files = {name: (export / name).read_bytes() for name in (DIT_WEIGHTS, DIT_META, TOKENIZER_FILE)}
    for name, files in (("autoencoder", {AE_WEIGHTS: save(ae.state_dict()), AE_META: json.dumps(ae_meta.to_json()).encode()}),
                        ("dit", dit_files)):
        out = Storage.from_uri(str(root / "steps" / name))
        for rel, data in files.items():
            out.write_bytes(rel, data)
        manifest = Manifest(step=name, cache_key="k", code_version="1", location=out.uri(), upstream={}, config={},
                            files=[FileRecord(rel, out.sha256(rel), out.size(rel)) for rel in sorted(files)])
        out.write_text("manifest.json", manifest.to_json())
        records.append({"name": name, "status": "ran", "cache_key": "k", "manifest_uri": out.uri("manifest.json")})
    Storage.from_uri(str(root)).write_text("workflows/wf/summary.json", json.dumps({"workflow_id": "wf", "steps": records}))


def test_sample_draws_each_prompt_under_each_label(trained, tmp_path):
    export, _ = trained
    write_workflow(tmp_path / "root", export)
    common = dict(storage=str(tmp_path / "root"), steps=4, guidance=2.0, seed=0, progress=False)
    prompts = ["a thin digit", "a thick digit"]
    result = sample_prompts("wf", prompts, None, 2, tmp_path / "out", labels="c,0", **common)
    assert result.classes == prompts * 2  # row = label-major (label, prompt): (c, thin) (c, thick) (a, thin) (a, thick)
    rows = json.loads((tmp_path / "out" / "prompts.json").read_text())["prompts"]
    assert [(row["label"], row["prompt"]) for row in rows] == [("c", prompts[0]), ("c", prompts[1]),
                                                               ("a", prompts[0]), ("a", prompts[1])]
    dit, meta = load_dit(str(export))
    ae, ae_meta = tiny_autoencoder()
    want = generate(dit, meta, ae, ae_meta, [2, 2, 2, 2, 0, 0, 0, 0], SAMPLING, prompts=[p for p in prompts * 2
                                                                                         for _ in range(2)])
    assert (tmp_path / "out" / "2" / "1.png").read_bytes() == png(want[5])  # row 2 = (a, thin), its image 1
    with pytest.raises(BadFlag, match="class\\+text.*give --labels as well as --prompt"):
        sample_prompts("wf", prompts, None, 1, tmp_path / "none", **common)


def test_cli_refuses_per_label_with_prompts():
    from pipelines.cli import app

    result = CliRunner().invoke(app, ["sample", "--workflow-id", "wf", "--labels", "0", "--per-label", "2",
                                      "--prompt", "a thin digit", "--out", "x"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "not --per-label" in result.output and "--per-prompt" in result.output


def test_the_served_generator_takes_label_and_prompt_columns(trained):
    export, _ = trained
    dit, meta = load_dit(str(export))
    ae, ae_meta = tiny_autoencoder()
    served = LatentflowGenerator()
    served.generator = Generator("dit", dit, meta, ae, ae_meta, SAMPLING.model_dump())
    assert served.generator.columns == ["label", "prompt"]
    signature = generator_signature(True, served.generator.columns)
    assert [c.name for c in signature.inputs.inputs] == ["label", "prompt", "seed", "steps", "guidance"]
    assert [c.name for c in signature.outputs.inputs] == ["label", "prompt", "image"]
    assert list(generator_example("dit", meta, None)[["label", "prompt"]].itertuples(index=False)) == [(2, "a thin digit")]
    answer = served.predict(None, pd.DataFrame({"label": ["c", "0"], "prompt": ["a thick digit", "a thin digit"],
                                                "seed": [0, 0]}))
    assert list(answer["label"]) == [2, 0] and list(answer["prompt"]) == ["a thick digit", "a thin digit"]
    want = generate(dit, meta, ae, ae_meta, [2, 0], SAMPLING, prompts=["a thick digit", "a thin digit"])
    assert list(answer["image"]) == [png(image) for image in want]
    with pytest.raises(ValueError, match="row 0: a text-conditioned model needs a 'prompt'"):
        served.predict(None, pd.DataFrame({"label": [1], "seed": [0]}))
    with pytest.raises(ValueError, match="takes label and prompt"):
        served.generator.images(None, prompts=["a thin digit"])


def test_the_pipeline_refuses_what_cannot_take_a_label_and_a_caption():
    from conftest import REPO
    from pipelines.config import load_pipeline_config

    recipe = REPO / "configs" / "pipeline" / "mnist-text.yaml"
    both = ["dit.conditioning=class+text", "dit.grid_prompts=null"]
    with pytest.raises(ConfigError, match="dit.conditioning: class\\+text: the distill section"):
        load_pipeline_config(recipe, [*both, "distill.method=progressive"])
    with pytest.raises(ConfigError, match="dit.conditioning: class\\+text needs captions in the shards"):
        load_pipeline_config(recipe, [*both, "shard.captions=none"])
    with pytest.raises(ConfigError, match="dit.conditioning: class\\+text: noisy_classifier sample"):
        load_pipeline_config(recipe, [*both, "noisy_classifier.t_buckets=2"])
    with pytest.raises(ConfigError, match="dit.grid_prompts: a class\\+text DiT"):
        load_pipeline_config(recipe, both[:1])
    cfg = load_pipeline_config(recipe, both)
    assert cfg.dit.uses_classes and cfg.dit.uses_text
