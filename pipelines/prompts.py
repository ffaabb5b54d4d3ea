"""The prompts of ``latentflow sample --prompt … / --prompts FILE``: read, checked, and recorded beside
the images (``OUT/<prompt index>/<i>.png``, ``OUT/grid.png`` with one row per prompt, ``OUT/prompts.json``).

A prompts file is UTF-8 text with one prompt per line (blank lines and lines starting with ``#`` are
skipped), or a ``.json`` file holding a list of strings. Prompts are kept as written: the text model's
tokenizer normalises them, so what ``prompts.json`` records is what the user asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS_JSON = "prompts.json"
MAX_PROMPT_CHARS = 1000  # a longer "prompt" is a wrong file, not a caption


class PromptError(ValueError):
    """Prompts that cannot be used; the message names the file or the prompt at fault."""


def read_prompts_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PromptError(f"--prompts {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise PromptError(f"--prompts {path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptError(f"--prompts {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise PromptError(f"--prompts {path}: a .json prompts file holds a list of strings")
        return prompts
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def gather_prompts(prompts: list[str] | None, prompts_file: str | Path | None) -> list[str]:
    """The ``--prompt`` values, then the file's, checked: at least one, none longer than MAX_PROMPT_CHARS.
    An empty prompt is allowed: it is the unconditional (null) caption."""
    gathered = list(prompts or []) + (read_prompts_file(prompts_file) if prompts_file else [])
    if not gathered:
        where = f" ({prompts_file} holds none)" if prompts_file else ""
        raise PromptError(f"give at least one --prompt or a --prompts file{where}")
    for index, prompt in enumerate(gathered):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptError(f"prompt {index} is {len(prompt)} characters long (at most {MAX_PROMPT_CHARS}): "
                              f"{prompt[:60]!r}…")
    return gathered


def write_prompts_json(out: Path, prompts: list[str], per_prompt: int, extra: dict | None = None,
                       labels: list[str] | None = None) -> Path:
    """``OUT/prompts.json``: which folder holds which prompt (a class+text DiT's rows: and which ``labels``,
    one class name per row), and how many images each has."""
    rows = [{"index": i, "prompt": p, "folder": str(i)} for i, p in enumerate(prompts)]
    for row, label in zip(rows, labels or []):
        row["label"] = label
    record = {"prompts": rows, "per_prompt": per_prompt, **(extra or {})}
    path = Path(out) / PROMPTS_JSON
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
