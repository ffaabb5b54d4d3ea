"""What the DiT step prepares on the driver for text conditioning, before training starts: the joint
encoder's tokenizer (one verified pass over the training captions, in bounded memory), the DiT's
text arguments (the encoder's widths), and the grid's prompts."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from components.common.step import Manifest
from components.dit.config import DitConfig

GRID_PROMPTS_DEFAULT = 8  # grid rows when dit.grid_prompts is unset: the first validation captions


@dataclass(frozen=True)
class TextSetup:
    tokenizer_json: str | None  # the joint encoder's vocabulary; None for a frozen encoder
    arguments: dict[str, int]  # the DiT's context_dim, pooled_dim
    grid_prompts: list[str]
    vocabulary: int  # entries of the tokenizer (0: a frozen encoder's own)
    encoder_files: dict[str, str] | None = None  # a frozen encoder's {file: sha256}, checked at every load
    grid_labels: list[int] | None = None  # class+text: each grid prompt's class (the caption's own label)


def check_captions(cfg: DitConfig, latents: Manifest | None) -> None:
    from components.common.data import has_captions

    if cfg.data != "latents" or latents is None:
        raise ValueError("dit.conditioning with text trains on the latents step's latents and captions: "
                         "set dit.data: latents and add the latents section")
    if not has_captions(latents):
        raise ValueError(f"dit.conditioning is {cfg.conditioning!r} but the shards carry no captions: "
                         "set shard.captions (sidecar, a captions file, or attributes for builtin:mnist)")


def prepare_text(cfg: DitConfig, latents: Manifest) -> TextSetup:
    """The tokenizer, the DiT's text arguments and the grid prompts of a text-conditioned DiT step."""
    from components.common.data import latent_split, split_captions
    from components.dit.text_model import text_dit_arguments
    from components.text.frozen import directory_digests
    from components.text.load import build_text_encoder, tokenizer_from_captions

    check_captions(cfg, latents)
    files = None if cfg.text.kind == "joint" else directory_digests(cfg.text.path)
    if files is not None:
        check_stored_text(cfg, latents, files)
    tokenizer = None
    if cfg.text.kind == "joint":
        tokenizer = tokenizer_from_captions(cfg.text, split_captions(latent_split(latents, "train", captions=True)))
    encoder = build_text_encoder(cfg.text, tokenizer, "dit.text")  # a probe, for its widths
    prompts, labels = cfg.grid_prompts, None
    if prompts is None:
        prompts, labels = grid_captions(cfg, latents)
    return TextSetup(tokenizer.to_json() if tokenizer else None, text_dit_arguments(encoder), list(prompts),
                     tokenizer.vocab_size if tokenizer else 0,
                     files, labels)


def check_stored_text(cfg: DitConfig, latents: Manifest, files: dict[str, str]) -> None:
    """Stored caption embeddings are used only when dit.text's frozen encoder made them (refused otherwise,
    naming both); ``precompute`` without any is refused too (the latents step ran without latents.text_encoder)."""
    from components.text.stored import check_same_encoder, stored_record

    record = stored_record(latents)
    if record is not None:
        check_same_encoder(record, cfg.text, files, latents.step)
    elif cfg.text.precompute:
        raise ValueError(f"dit.text.precompute: step {latents.step} stored no text embeddings (its "
                         "latents.text_encoder is unset); let the pipeline config fill it, or drop precompute")


def grid_captions(cfg: DitConfig, latents: Manifest) -> tuple[list[str], list[int] | None]:
    """The grid's rows when dit.grid_prompts is unset: the first distinct validation captions (the training
    ones without a validation split); for class+text, distinct (label, caption) pairs with their labels
    (unlabelled samples skipped: a class+text row needs its class)."""
    from components.common.data import latent_split, split_captions, split_labelled_captions

    validation = latent_split(latents, "val", captions=True)
    if not validation.shards:
        validation = latent_split(latents, "train", captions=True)
    if not cfg.uses_classes:
        prompts = list(dict.fromkeys(islice(split_captions(validation), 4 * GRID_PROMPTS_DEFAULT)))
        return prompts[:GRID_PROMPTS_DEFAULT], None
    labelled = (pair for pair in split_labelled_captions(validation) if pair[0] >= 0)
    pairs = list(dict.fromkeys(islice(labelled, 4 * GRID_PROMPTS_DEFAULT)))[:GRID_PROMPTS_DEFAULT]
    return [caption for _, caption in pairs], [label for label, _ in pairs]
