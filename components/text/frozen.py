"""A frozen pretrained text encoder (Imagen's choice): CLIP's text tower or T5's encoder through
``transformers``, loaded only from a local directory (``local_files_only``: nothing is downloaded, ever).

pooled: CLIP's own pooled output (the eos token's final state, which its causal mask makes the one
token that saw the whole caption); T5 has no pooled token, so the masked mean of its tokens (as Imagen
pools T5). The null is the tokenizer's encoding of the empty caption, as for the joint encoder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from components.text.model import NULL_CAPTION, TextEncoding, masked_mean

INSTALL_HINT = "pip install 'latentflow[text]' (or: pip install transformers)"


def import_transformers(kind: str):
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError(f"the text encoder kind {kind!r} needs the transformers package, which is not "
                           f"installed: {INSTALL_HINT}") from e
    return transformers


def check_local_directory(path: str | Path, config_key: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"{config_key}: the frozen text encoder's directory {str(directory)!r} does not exist "
                                f"(a local transformers save_pretrained directory; nothing is downloaded)")
    return directory


# Weight files transformers may unpickle: a frozen directory must hold its weights as safetensors.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def directory_digests(path: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a frozen encoder's directory, read in 1 MiB blocks: the
    DiT step records them in dit.json, so a later load (or a served model's bundled copy) is checked."""
    directory = Path(path).expanduser()
    digests = {}
    for file in sorted(f for f in directory.rglob("*") if f.is_file()):
        sha = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digests[file.relative_to(directory).as_posix()] = sha.hexdigest()
    return digests


def verify_directory(path: str | Path, recorded: dict[str, str], config_key: str = "text.path") -> None:
    """Refuse a frozen encoder's directory whose files differ from those the model was trained with."""
    found = directory_digests(path)
    changed = sorted(name for name in recorded.keys() | found.keys() if recorded.get(name) != found.get(name))
    if changed:
        raise ValueError(f"{config_key}: the frozen text encoder's directory {str(path)!r} is not the one the "
                         f"model was trained with: {', '.join(changed[:5])} "
                         f"{'differs' if len(changed) == 1 else 'differ'} from the sha256 recorded at training")


class FrozenTextEncoder(nn.Module):
    """A transformers text model and its tokenizer, frozen: no gradients, always in eval mode."""

    def __init__(self, kind: str, path: str | Path, max_tokens: int, config_key: str = "text.path"):
        super().__init__()
        directory = check_local_directory(path, config_key)
        pickled = sorted(f.name for f in directory.iterdir() if f.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise ValueError(f"{config_key}: {str(directory)!r} holds pickled weights ({', '.join(pickled)}); "
                             "save the encoder with safetensors (save_pretrained(..., safe_serialization=True))")
        transformers = import_transformers(kind)
        model_class = {"frozen_clip": transformers.CLIPTextModel, "frozen_t5": transformers.T5EncoderModel}[kind]
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.model = model_class.from_pretrained(directory, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{config_key}: {str(directory)!r} is not a loadable {kind} directory: {e}") from e
        self.kind = kind
        self.max_tokens = max_tokens
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the surrounding model's mode
        return self

    @property
    def context_dim(self) -> int:
        return int(self.model.config.hidden_size if self.kind == "frozen_clip" else self.model.config.d_model)

    @property
    def pooled_dim(self) -> int:
        return self.context_dim

    @torch.no_grad()
    def forward(self, captions: list[str]) -> TextEncoding:
        batch = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()  # (B, L) each
        out = self.model(input_ids=ids, attention_mask=mask.long())
        tokens = out.last_hidden_state  # (B, L, D)
        pooled = out.pooler_output if self.kind == "frozen_clip" else masked_mean(tokens, mask)  # (B, D)
        return TextEncoding(tokens, mask, pooled)

    def null(self, batch_size: int = 1) -> TextEncoding:
        return self([NULL_CAPTION] * batch_size)
