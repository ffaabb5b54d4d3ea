"""Text super-resolution stages: the pooled text embedding in the U-Net's conditioning vector (zero at
initialisation), a stage trained on captioned shards with its own joint encoder, its tokenizer exported
and loaded, prompts and guidance at sampling, the cascade's prompts, and the config's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.common.train_loop import LocalSession, train_loop
from components.superres.config import SuperResConfig
from components.superres.load import SR_META, load_superres
from components.superres.model import EfficientUNet
from components.superres.sample import SrStage, cascade, super_resolve
from components.superres.task import SuperResTask
from components.superres.text_model import StageText, TextSuperRes, prepare_stage_text
from components.superres.train import build_step_superres
from components.diffusion import sample_generator
from components.text.load import TOKENIZER_FILE
from test_caption_stream import shard_step

pytestmark = pytest.mark.usefixtures("one_thread")


def generators(n, seed=0, stream=1):
    return [sample_generator(seed, i, stream) for i in range(n)]


def test_the_text_projection_starts_at_zero_so_an_untrained_text_stage_is_the_stage_without_text():
    """Decision: an untrained text projection adds nothing, so a text stage starts as the same weights
    without text, whatever the prompt (and the other weights initialise exactly as without text)."""
    arguments = dict(in_channels=1, out_size=16, channels=8, channel_mults=(1, 2), blocks=(1, 1))
    torch.manual_seed(0)
    plain = EfficientUNet(**arguments)
    torch.manual_seed(0)
    text = EfficientUNet(**arguments, pooled_dim=6)
    shared = {k: v for k, v in text.state_dict().items() if not k.startswith("text_proj.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())
    for p in plain.parameters():  # a "trained" super-resolver: the same weights in both
        p.data.add_(0.05 * torch.randn_like(p))
    missing, unexpected = text.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and set(missing) == {k for k in text.state_dict() if k.startswith("text_proj.")}
    x, low, t, s = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 90])
    reference = plain(x, t, low, s)
    for pooled in (torch.randn(2, 6), 10 * torch.randn(2, 6)):
        torch.testing.assert_close(text(x, t, low, s, pooled=pooled), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="text-conditioned: give the pooled text embedding"):
        text(x, t, low, s)
    text.text_proj[-1].weight.data.normal_(std=0.1)  # once learned, the text matters
    assert not torch.allclose(text(x, t, low, s, pooled=torch.randn(2, 6)), text(x, t, low, s, pooled=torch.randn(2, 6)))


def text_stage_config(**train):
    return SuperResConfig(input_size=8, output_size=16, preset="sr-tiny",
                          text={"kind": "joint", "width": 16, "depth": 1, "heads": 2, "max_tokens": 12,
                                "caption_dropout": 0.2},
                          sample={"steps": 4, "guidance": 3.0, "thresholding": "none"},
                          train=dict(max_steps=12, batch_size=8, lr=3e-3, ema_decay=0.5, log_every=6,
                                     checkpoint_every=100, **train))


def stage_meta(cfg: SuperResConfig, arguments: dict, text) -> dict:
    return {"preset": cfg.preset, "model": arguments, "input_size": cfg.input_size, "output_size": cfg.output_size, "channels": 1,
            "schedule": cfg.schedule, "num_timesteps": cfg.num_timesteps, "filter": cfg.filter, "num_classes": 0,
            "classes": None, "prediction": cfg.prediction, "sampling": cfg.sample.model_dump(mode="json"),
            "augmentation": cfg.augmentation.model_dump(mode="json"), "parameters": 0, "max_steps": cfg.train.max_steps,
            "text": cfg.text.model_dump(mode="json"), "text_encoder_files": text.encoder_files}


@pytest.fixture(scope="module")
def trained_text_stage(tmp_path_factory):
    """A text stage trained from captioned shards (the shard step's own writer, MNIST attribute captions),
    the captions streamed with the images; its export directory."""
    tmp = tmp_path_factory.mktemp("sr-text")
    shard = shard_step(tmp / "shard", "attributes")
    cfg = text_stage_config()
    text = prepare_stage_text(cfg, shard, "superres_1")
    arguments = build_step_superres(cfg, 1, 0, text.pooled_dim).arguments
    task = SuperResTask(cfg, arguments, stage_meta(cfg, arguments, text), shard=shard,
                        tokenizer_json=text.tokenizer_json)
    final = train_loop(task, cfg.train, LocalSession(tmp / "ckpt"), None)
    export = sorted((tmp / "ckpt").glob("checkpoint_*"))[-1] / "export"
    return final, export, text


def test_a_text_stage_trains_on_captioned_shards_and_exports_its_tokenizer(trained_text_stage):
    final, export, text = trained_text_stage
    assert final["step"] == 12 and torch.isfinite(torch.tensor(final["loss"]))
    assert (export / TOKENIZER_FILE).read_text(encoding="utf-8") == text.tokenizer_json
    assert json.loads((export / SR_META).read_text())["model"]["pooled_dim"] == text.pooled_dim == 16
    stage = load_superres(str(export))
    assert stage.takes_text and isinstance(stage.model, TextSuperRes)
    assert stage.model.unet.text_proj[-1].weight.abs().max() > 0  # the projection learned from zero
    assert stage.model.encoder.tokenizer.vocab_size > 10  # the training captions' words


def test_a_loaded_text_stage_follows_its_prompt_under_guidance(trained_text_stage):
    _, export, _ = trained_text_stage
    stage = load_superres(str(export))
    assert stage.sampling.guidance == 3.0
    low = torch.rand(2, 1, 8, 8) * 2 - 1
    thin, thick = ["a thin zero standing upright"] * 2, ["a thick seven leaning right"] * 2
    with torch.inference_mode():
        first = super_resolve(stage, low, generators(2), prompts=thin)
        again = super_resolve(stage, low, generators(2), prompts=thin)
        other = super_resolve(stage, low, generators(2), prompts=thick)
        unguided = super_resolve(load_superres(str(export), guidance=0.0), low, generators(2), prompts=thin)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-4 and (first - unguided).abs().max() > 1e-4
    with pytest.raises(ValueError, match="text-conditioned: it needs one prompt per image"):
        super_resolve(stage, low, generators(2))
    # the cascade hands each image's prompt to every text stage, batch by batch
    base = ((low + 1) * 127.5).round().to(torch.uint8)
    by_cascade = cascade(base, [stage], [0, 0], seed=0, batch_size=1, prompts=thin)
    assert by_cascade.shape == (2, 1, 16, 16)
    assert not torch.equal(by_cascade, cascade(base, [stage], [0, 0], seed=0, batch_size=1, prompts=thick))
    with pytest.raises(ValueError, match=r"stage\(s\) \[1\] take text: the cascade needs one prompt per image"):
        cascade(base, [stage], [0, 0], seed=0)
    # the step's own evaluation super-resolves validation images with their captions
    from components.superres.train import evaluate_stage

    metrics, rows = evaluate_stage(stage, base.repeat(1, 1, 2, 2), None, text_stage_config(), prompts=thin)
    assert rows.shape == (3, 2, 1, 16, 16) and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_the_null_text_is_what_caption_dropout_trains_and_guidance_swaps_in(trained_text_stage):
    """Guidance's unconditional half gets the empty caption's pooled embedding: at w the guided
    output of one deterministic DDIM step is (1 + w)·conditional − w·(empty caption) of x0-models."""
    _, export, _ = trained_text_stage
    low = torch.rand(2, 1, 8, 8) * 2 - 1
    prompts = ["a thin zero standing upright", "a thick seven leaning right"]
    one_step = {"steps": 1, "thresholding": "none"}

    def draw(guidance, captions):
        stage = load_superres(str(export), guidance=guidance, **one_step)
        stage.meta.prediction = "x0"  # one DDIM step of an x0-model returns x̂_0: linear in the halves
        with torch.inference_mode():
            return super_resolve(stage, low, generators(2), prompts=captions)

    w = 2.0
    conditional, unconditional = draw(0.0, prompts), draw(0.0, ["", ""])
    expected = ((1 + w) * conditional - w * unconditional).clamp(-1, 1)
    inside = (conditional.abs() < 1) & (unconditional.abs() < 1)  # super_resolve clamps its outputs to [-1, 1]
    assert inside.float().mean() > 0.9 and not torch.allclose(conditional, unconditional)
    torch.testing.assert_close(draw(w, prompts)[inside], expected[inside], rtol=1e-5, atol=1e-5)


def pipeline(dit_text: bool, stage_text: dict | None, captions: str = "attributes", evaluate: bool = True,
             model: dict | None = None):
    import yaml

    from pipelines.config import PipelineConfig

    recipe = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "smoke-text.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["shard"]["captions"] = captions
    if not dit_text:
        data["dit"] = {k: v for k, v in data["dit"].items() if k not in ("conditioning", "text", "grid_prompts")}
    if not evaluate:
        data.pop("evaluate")
    data["superres"] = [{"input_size": 16, "output_size": 32, "preset": "sr-tiny", "text": stage_text,
                         "model": model or {}}]
    return PipelineConfig(**data)


def test_the_config_takes_text_stages_and_refuses_a_textless_stage_under_a_text_dit():
    joint = {"kind": "joint", "width": 16, "depth": 1, "heads": 2}
    assert pipeline(True, joint).superres[0].text.kind == "joint"  # every stage takes text: evaluated
    assert pipeline(False, joint).superres[0].text is not None  # a class DiT: the prompts are real captions
    assert pipeline(True, None, evaluate=False).superres[0].text is None  # not evaluated: nothing passes prompts
    with pytest.raises(ValueError, match=r"superres.0 takes no text; set superres.0.text"):
        pipeline(True, None)
    with pytest.raises(ValueError, match=r"superres.0.text needs captions in the shards"):
        pipeline(False, joint, captions="none")
    with pytest.raises(ValueError, match=r"superres.0.model.pooled_dim is 8, but the data has 0 .superres.0.text is unset."):
        pipeline(True, None, evaluate=False, model={"pooled_dim": 8})
    # no text: the stage's cache-relevant config is what it was before the field existed
    assert "text" not in SuperResConfig(input_size=8, output_size=16).cache_relevant()
    assert "text" in SuperResConfig(input_size=8, output_size=16, text=joint).cache_relevant()


def test_a_textless_cascade_is_unchanged_by_prompts():
    torch.manual_seed(0)
    model = build_step_superres(SuperResConfig(input_size=8, output_size=16, preset="sr-tiny"), 1, 0)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    from components.superres.config import SuperResSamplingConfig
    from components.superres.load import SuperResMeta

    meta = SuperResMeta(preset="sr-tiny", model=model.arguments, input_size=8, output_size=16, channels=1,
                        schedule="cosine", num_timesteps=1000, filter="bicubic", num_classes=0, classes=None,
                        prediction="v", sampling={}, augmentation={}, parameters=0, max_steps=0)

    stage = SrStage(model.eval(), meta, SuperResSamplingConfig(steps=2))
    base = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(cascade(base, [stage], [0, 1], seed=0), cascade(base, [stage], [0, 1], seed=0, prompts=["a", "b"]))


def test_the_evaluated_cascade_gives_each_sample_its_prompt_or_a_caption_of_its_class(tmp_path):
    from components.common.step import FileRecord, Manifest
    from components.common.storage import Storage
    from components.evaluate.cascade import cascade_prompts
    from components.evaluate.prompts import prompts_per_class
    from components.shard.captions import caption_plan
    from components.shard.config import ShardConfig
    from components.shard.run import shard_chunk
    from components.shard.sources import open_source

    cfg = ShardConfig(source="builtin:mnist", captions="attributes", max_samples=80, val_fraction=0.5)
    source, storage = open_source(cfg.source), Storage.from_uri(str(tmp_path))
    result = shard_chunk(0, source.list_items()[0][:80], source, cfg, storage, caption_plan(cfg))
    rels = result["files"]["train"] + result["files"]["val"]
    shard = Manifest(step="shard", cache_key="k", code_version="1", location=storage.uri(), config={}, upstream={},
                     files=[FileRecord(rel, storage.sha256(rel), storage.size(rel)) for rel in rels],
                     info={"train_shards": result["files"]["train"], "val_shards": result["files"]["val"],
                           "train_counts": result["file_counts"]["train"], "val_counts": result["file_counts"]["val"],
                           "image_format": "png", "on_bad_sample": "fail", "captions": "attributes"})
    classes = ["0", "1", "2"]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    chosen = torch.tensor([0, 1, 2, 4, 5])
    given = [f"prompt {i}" for i in range(len(labels))]
    assert cascade_prompts(shard, labels, classes, chosen, given) == ["prompt 0", "prompt 1", "prompt 2", "prompt 4",
                                                                    "prompt 5"]
    by_class = prompts_per_class(shard, classes, 2)  # class-major: two validation captions of each class
    assert cascade_prompts(shard, labels, classes, chosen, None) == [by_class[0], by_class[1], by_class[2],
                                                                   by_class[4], by_class[5]]
    assert len(set(by_class)) > 1


def test_sample_cascade_takes_prompts_for_text_stages_and_labels_for_class_stages(monkeypatch):
    """``latentflow sample --step cascade``: labels refuse a text stage, prompts a class-conditional one
    (the stages' loading is not the point here: each stage is its meta)."""
    import components.superres.load
    import pipelines.sample
    from components.superres.config import SuperResSamplingConfig

    metas = {"superres_1": {"text": {"kind": "joint"}, "num_classes": 0}, "superres_2": {"num_classes": 0}}
    monkeypatch.setattr(pipelines.sample, "step_manifest", lambda summary, name, uri: name)
    monkeypatch.setattr(components.superres.load, "load_superres",
                        lambda name, device, **overrides: SrStage(None, metas[name], SuperResSamplingConfig()))
    summary = {"workflow_id": "w", "steps": [{"name": "superres_1"}, {"name": "superres_2"}]}
    stages = pipelines.sample.superres_stages(summary, "file:///s.json", "cpu", prompted=True)
    assert [stage.takes_text for stage in stages] == [True, False]
    with pytest.raises(pipelines.sample.BadFlag, match="superres_1 of workflow 'w' take.s. text: sample the cascade "
                                                       "from prompts"):
        pipelines.sample.superres_stages(summary, "file:///s.json", "cpu")
    metas["superres_2"]["num_classes"] = 10
    with pytest.raises(pipelines.sample.BadFlag, match="superres_2 of workflow 'w' is class-conditional: a prompt"):
        pipelines.sample.superres_stages(summary, "file:///s.json", "cpu", prompted=True)


def test_a_frozen_encoder_stays_out_of_the_weights_and_its_directory_is_checked_at_load(tmp_path):
    from components.text.frozen import directory_digests
    from test_text_encoder import save_tiny_model

    save_tiny_model(tmp_path / "t5", "frozen_t5")
    cfg = SuperResConfig(input_size=8, output_size=16, preset="sr-tiny",
                         text={"kind": "frozen_t5", "path": str(tmp_path / "t5"), "max_tokens": 8},
                         train=dict(max_steps=1, batch_size=4))
    text_files = directory_digests(tmp_path / "t5")
    arguments = build_step_superres(cfg, 1, 0, 16).arguments
    meta = stage_meta(cfg, arguments, StageText(None, 16, text_files))
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    task = SuperResTask(cfg, arguments, meta, in_memory=(images, torch.zeros(4, dtype=torch.long),
                                                         ["a thick seven", "a thin two", "", "seven"]))
    model = task.build_model()
    assert not any(k.startswith(("text_encoder.", "_frozen")) for k in model.state_dict())  # frozen: not trained
    batch = next(iter(task.batch_source(0, 1, 4).epoch(0, 0, 0))).tensors
    assert sorted(batch["caption"]) == ["", "a thick seven", "a thin two", "seven"]  # shuffled, with the images
    assert batch["high"].shape == (4, 1, 16, 16) and batch["low"].shape == (4, 1, 8, 8)
    for name, p in model.unet.named_parameters():  # a "trained" U-Net: past its zero-initialised convolutions
        if not name.startswith("text_proj."):
            p.data.add_(0.05 * torch.randn_like(p))
    loss, _ = task.loss(model, batch, 0, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.unet.text_proj[-1].weight.grad.abs().max() > 0  # the projection learns from the frozen pooled text
    task.export(model, model, tmp_path)
    assert not (tmp_path / TOKENIZER_FILE).exists()
    assert load_superres(str(tmp_path)).takes_text
    (tmp_path / "t5" / "config.json").write_text((tmp_path / "t5" / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match=r"superres.text.path: .* not the one the model was trained with: config.json"):
        load_superres(str(tmp_path))
