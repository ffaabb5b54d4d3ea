"""The text-conditioned DiT through its task (one process, no Ray): captions in the batch, caption
dropout, the joint encoder trained with the DiT, the export with its tokenizer, loading it back, and
sampling with prompts under guidance."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from components.common.train_loop import LocalSession, train_loop
from components.dit.config import DitConfig, SamplingConfig
from components.dit.generate import generate
from components.dit.load import load_dit
from components.dit.task import LatentDitTask, grid_conditions
from components.dit.text_model import TextDiT, text_dit_arguments
from components.dit.train import build_step_dit
from components.text.load import TOKENIZER_FILE, build_text_encoder, tokenizer_from_captions
from test_dit import LATENT, tiny_autoencoder
import metas

WORDS = ("zero", "one", "two")


def captioned_latents(n: int = 96, seed: int = 0):
    """Latents whose pattern depends on the digit their caption names, the label kept aside."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(WORDS)
    patterns = torch.randn(len(WORDS), *LATENT, generator=g)
    captions = [f"a {'thick' if i % 2 else 'thin'} {WORDS[int(label)]}" for i, label in enumerate(labels)]
    return patterns[labels] + 0.3 * torch.randn(n, *LATENT, generator=g), labels, captions


def text_cfg(**overrides) -> DitConfig:
    train = {"max_steps": 30, "batch_size": 16, "lr": 2e-3, "ema_decay": 0.5, "log_every": 10,
             "checkpoint_every": 1000, **overrides.pop("train", {})}
    return DitConfig(preset="DiT-Micro/2", conditioning="text", train=train,
                     text={"width": 32, "depth": 1, "heads": 2, "max_tokens": 8, "caption_dropout": 0.2},
                     **overrides)


class RecordingTask(LatentDitTask):
    def loss(self, model, batch, step, generator):
        loss, extras = super().loss(model, batch, step, generator)
        self.record.append((float(loss.detach()), list(batch["caption"])))
        return loss, extras


def text_task(cfg: DitConfig, data) -> RecordingTask:
    tokenizer = tokenizer_from_captions(cfg.text, data[2])
    arguments = text_dit_arguments(build_text_encoder(cfg.text, tokenizer))
    kwargs = build_step_dit(cfg, LATENT, None, arguments).arguments
    meta = metas.dit_meta(schedule=cfg.schedule, num_timesteps=cfg.num_timesteps, prediction=cfg.prediction,
                          learn_sigma=False, num_classes=3, null_label=None, latent_shape=LATENT, model=kwargs,
                          text=cfg.text.model_dump(mode="json"), conditioning="text")
    task = RecordingTask(cfg, kwargs, meta.to_json(), in_memory=data, tokenizer_json=tokenizer.to_json())
    task.record = []
    return task


def test_a_text_dit_has_no_class_embedding_and_takes_the_encoder_widths():
    cfg = text_cfg()
    task = text_task(cfg, captioned_latents())
    model = task.build_model()
    assert isinstance(model, TextDiT) and model.dit.y_embedder is None and model.dit.null_class_id is None
    assert task.model_kwargs["context_dim"] == task.model_kwargs["pooled_dim"] == 32
    assert any(name.startswith("text_encoder.") for name in model.state_dict())  # trained with the DiT
    with pytest.raises(ValueError, match="dit.text and dit.grid_prompts are for text conditioning"):
        DitConfig(text={"width": 32})
    assert "conditioning" not in DitConfig().cache_relevant()  # class DiTs keep their cache keys


def trained_export(tmp_path: Path) -> tuple[Path, list[float]]:
    """A text DiT trained 30 steps in one process: its export directory (dit.json written as the step
    writes it) and the step losses."""
    cfg = text_cfg()
    task = text_task(cfg, captioned_latents())
    final = train_loop(task, cfg.train, LocalSession(tmp_path / "ckpt"), None)
    assert final["step"] == 30
    export = sorted((tmp_path / "ckpt").iterdir())[-1] / "export"
    return export, [loss for loss, _ in task.record]


def test_it_learns_with_caption_dropout_and_exports_its_tokenizer(tmp_path):
    export, losses = trained_export(tmp_path)
    assert statistics.mean(losses[-6:]) < 0.7 * statistics.mean(losses[:6])
    words = json.loads((export / TOKENIZER_FILE).read_text())["words"]
    assert {"a", "thin", "thick", *WORDS} == set(words)  # the training captions' words, nothing else
    assert json.loads((export / "dit.json").read_text())["conditioning"] == "text"


def test_caption_dropout_feeds_the_null_caption_at_its_rate(tmp_path, monkeypatch):
    seen = []
    cfg = text_cfg(train={"max_steps": 12})
    task = text_task(cfg, captioned_latents())
    model = task.build_model()
    real_forward = model.forward

    def recording(*args, captions=None, **kwargs):
        seen.extend(captions)
        return real_forward(*args, captions=captions, **kwargs)

    generator = torch.Generator().manual_seed(0)
    data = captioned_latents()
    model.forward = recording
    for step in range(12):
        batch = {"latent": data[0][16 * (step % 6):16 * (step % 6 + 1)], "label": data[1][:16],
                 "caption": data[2][:16]}
        task.loss(model, batch, step, generator)
    dropped = sum(caption == "" for caption in seen) / len(seen)
    assert 0.1 < dropped < 0.3  # caption_dropout 0.2


def test_the_exported_text_dit_loads_and_samples_prompts_with_guidance(tmp_path):
    export, _ = trained_export(tmp_path)
    dit, meta = load_dit(str(export))
    assert isinstance(dit, TextDiT) and dit.encoder.tokenizer.vocab_size > 4
    ae, ae_meta = tiny_autoencoder()
    sampling = SamplingConfig(steps=4, guidance=2.0)
    prompts = ["a thin zero", "a thick two", "a thin zero"]
    images = generate(dit, meta, ae, ae_meta, None, sampling, prompts=prompts)
    assert images.shape == (3, 1, 8, 8)
    other = generate(dit, meta, ae, ae_meta, None, sampling, prompts=["a thick two"] * 3)
    assert not torch.equal(images[0], other[0])  # the prompt, not only the seed, decides the image
    assert torch.equal(images[1], other[1])  # same prompt, same seed index: the same image
    again = generate(dit, meta, ae, ae_meta, None, sampling, prompts=prompts, batch_size=1)
    from rounding import assert_same_up_to_rounding

    assert_same_up_to_rounding(images, again)
    labels, expanded, rows = grid_conditions(text_cfg(grid_per_label=2), 3, ["a", "b"])
    assert (labels, expanded, rows) == (None, ["a", "a", "b", "b"], [0, 0, 1, 1])
