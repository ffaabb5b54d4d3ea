"""A word-level tokenizer built from the training captions, saved as JSON beside the model (no pickle).

Normalisation: lower-cased; a caption splits into words (runs of letters, an apostrophe inside a word
kept), single digits (so "17" is "1 7": a number never falls out of the vocabulary) and single
punctuation marks. ``decode(encode(c))`` is ``normalise(c)`` for a caption within ``max_tokens``."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3, in this order
TOKENIZER_FORMAT = "latentflow-word-tokenizer/1"
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*|\d|[^\w\s]|_")


def split_words(caption: str) -> list[str]:
    """The caption's tokens as strings, normalised (lower case, punctuation and digits split off)."""
    return _WORD.findall(caption.lower())


def normalise(caption: str) -> str:
    return " ".join(split_words(caption))


class BoundedCounter:
    """Word counts over a stream in bounded memory: past ``capacity`` distinct words the rarer half is
    dropped (a word frequent enough to matter keeps coming back; a rare one may be undercounted)."""

    def __init__(self, capacity: int):
        if capacity < 2:
            raise ValueError(f"the word counter's capacity must be at least 2, got {capacity}")
        self.capacity = capacity
        self.counts: Counter[str] = Counter()

    def update(self, words: Iterable[str]) -> None:
        self.counts.update(words)
        if len(self.counts) > self.capacity:
            self.counts = Counter(dict(self.counts.most_common(self.capacity // 2)))


class WordTokenizer:
    """Words <-> ids: specials first (pad 0, unk 1, bos 2, eos 3), then the vocabulary."""

    def __init__(self, words: list[str], max_tokens: int):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must leave room for bos and eos (at least 2), got {max_tokens}")
        duplicated = sorted({w for w, n in Counter(words).items() if n > 1} | set(words) & set(SPECIAL_TOKENS))
        if duplicated:
            raise ValueError(f"the tokenizer's words repeat or shadow special tokens: {duplicated[:5]}")
        self.vocabulary = list(SPECIAL_TOKENS) + list(words)
        self.ids = {word: index for index, word in enumerate(self.vocabulary)}
        self.max_tokens = max_tokens

    pad_id, unk_id, bos_id, eos_id = range(4)

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, caption: str) -> list[int]:
        """bos, the words (unknown ones as unk), eos; truncated to max_tokens, eos kept last."""
        words = [self.ids.get(word, self.unk_id) for word in split_words(caption)][: self.max_tokens - 2]
        return [self.bos_id, *words, self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return " ".join(self.vocabulary[i] for i in (int(i) for i in ids) if i not in specials)

    def encode_batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L) long, mask (B, L) bool, True on real tokens), padded to the batch's longest caption."""
        encoded = [self.encode(caption) for caption in captions]
        length = max((len(ids) for ids in encoded), default=2)
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.pad_id

    def to_json(self) -> str:
        return json.dumps({"format": TOKENIZER_FORMAT, "max_tokens": self.max_tokens,
                           "special_tokens": list(SPECIAL_TOKENS), "words": self.vocabulary[len(SPECIAL_TOKENS):]},
                          ensure_ascii=False, indent=0)

    def save(self, path: str | Path) -> str:
        """Write the JSON; returns its sha256 for the writer's manifest."""
        data = self.to_json().encode()
        Path(path).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable tokenizer JSON: {e}") from e
        return cls.from_json(text, str(path))

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer JSON") -> "WordTokenizer":
        """From ``to_json``'s text; ``source`` names it in errors (a file, a task's field)."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{source}: not a readable tokenizer JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != TOKENIZER_FORMAT:
            raise ValueError(f"{source}: not a {TOKENIZER_FORMAT} file (format {data.get('format')!r})"
                             if isinstance(data, dict) else f"{source}: not a tokenizer object")
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ValueError(f"{source}: special_tokens {data.get('special_tokens')} are not {list(SPECIAL_TOKENS)}")
        return cls(list(data["words"]), int(data["max_tokens"]))


def build_tokenizer(
    captions: Iterable[str], max_tokens: int, max_vocabulary: int, min_frequency: int = 1,
    counter_capacity: int = 100_000,
) -> WordTokenizer:
    """A tokenizer over the words of a caption stream (read once, in bounded memory): the most frequent
    words seen at least ``min_frequency`` times, ties in alphabetical order, at most ``max_vocabulary``
    entries with the four specials."""
    if max_vocabulary <= len(SPECIAL_TOKENS):
        raise ValueError(f"max_vocabulary {max_vocabulary} leaves no room beside the {len(SPECIAL_TOKENS)} specials")
    counter = BoundedCounter(counter_capacity)
    for caption in captions:
        counter.update(split_words(caption))
    frequent = sorted((item for item in counter.counts.items() if item[1] >= min_frequency),
                      key=lambda item: (-item[1], item[0]))
    words = [word for word, _ in frequent if word not in SPECIAL_TOKENS]
    return WordTokenizer(words[: max_vocabulary - len(SPECIAL_TOKENS)], max_tokens)
