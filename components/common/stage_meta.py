"""The base of a stage's typed metadata: what a step writes next to its weights (``<stage>.json``)
and its ``load_<stage>`` reads back, as a dataclass instead of a string-keyed dict.

``to_json``/``from_json`` keep the file exactly as the dict version wrote it: a subclass's fields
are the file's keys, and keys it does not know (written by newer or older code) are kept in
``extra`` and written back, so a round trip loses nothing. A field that defaults to None is one
older files may lack: it is written only when set; a field without a default is written always
(None as null), and a file without it is refused, naming the file and the key (``MissingMetaKey``).
Item access (``meta["classes"]``) stays for the readers that still take the dict form; new code
reads the fields. ``of`` takes either form, for functions whose callers may still pass the dict
(the training tasks carry the file's form to their workers).
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from components.common.step import Manifest
    from components.common.storage import Storage

Meta = TypeVar("Meta", bound="StageMeta")


class MissingMetaKey(ValueError):
    """A metadata file without a key its stage always writes."""

    def __init__(self, source: str, keys: list[str]):
        self.source, self.keys = source, list(keys)
        super().__init__(f"{source}: missing key{'s' if len(keys) > 1 else ''} {', '.join(map(repr, keys))} "
                         "(written by every run of its step: the file is damaged or not this stage's)")


@dataclasses.dataclass
class StageMeta:
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def required_names(cls) -> list[str]:
        """The keys every file has: the fields without a default."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]

    def to_json(self) -> dict[str, Any]:
        """The JSON object the step writes (plain dicts, lists and scalars)."""
        optional = {f.name for f in dataclasses.fields(self) if f.default is None}
        written = {name: getattr(self, name) for name in self.field_names()
                   if not (name in optional and getattr(self, name) is None)}
        return {**written, **self.extra}

    @classmethod
    def from_json(cls: type[Meta], data: dict[str, Any], source: str | None = None) -> Meta:
        """From the JSON object a step wrote (``source``: where it was read, for errors); a missing
        required key raises ``MissingMetaKey`` naming the source and every missing key."""
        where = source or f"{cls.__name__} JSON"
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [name for name in cls.required_names() if name not in data]
        if missing:
            raise MissingMetaKey(where, missing)
        known = set(cls.field_names())
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls: type[Meta], source: "Manifest | Storage | str", name: str) -> Meta:
        """``name`` of a step's outputs (from a manifest: checked against its sha256), errors naming its URI."""
        from components.common.step import as_storage, read_output

        uri = as_storage(source).uri(name)
        try:
            data = json.loads(read_output(source, name))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both
            raise ValueError(f"{uri}: not valid JSON ({e})") from e
        return cls.from_json(data, source=uri)

    @classmethod
    def of(cls: type[Meta], meta: "StageMeta | dict[str, Any]", source: str | None = None) -> Meta:
        """``meta`` as this class: itself when it already is one, else read from its JSON form."""
        if isinstance(meta, cls):
            return meta
        return cls.from_json(meta.to_json() if isinstance(meta, StageMeta) else meta, source)

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.to_json()
