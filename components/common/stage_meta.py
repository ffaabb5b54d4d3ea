"""The base of a stage's typed metadata: what a step writes next to its weights (``<stage>.json``)
and its ``load_<stage>`` reads back, as a dataclass instead of a string-keyed dict.

``to_json``/``from_json`` keep the file exactly as the dict version wrote it: a subclass's fields
are the file's keys, and keys it does not know (written by newer or older code) are kept in
``extra`` and written back, so a round trip loses nothing. A field that defaults to None is one
older files may lack: it is written only when set. Item access (``meta["classes"]``) stays
for the readers that still take the dict form (the samplers in dit/generate.py take a classifier's
meta that way); new code reads the fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

Meta = TypeVar("Meta", bound="StageMeta")


@dataclasses.dataclass
class StageMeta:
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    def to_json(self) -> dict[str, Any]:
        """The JSON object the step writes (plain dicts, lists and scalars)."""
        optional = {f.name for f in dataclasses.fields(self) if f.default is None}
        written = {name: getattr(self, name) for name in self.field_names()
                   if not (name in optional and getattr(self, name) is None)}
        return {**written, **self.extra}

    @classmethod
    def from_json(cls: type[Meta], data: dict[str, Any]) -> Meta:
        """From the JSON object a step wrote; a missing field raises TypeError naming it."""
        known = set(cls.field_names())
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)
