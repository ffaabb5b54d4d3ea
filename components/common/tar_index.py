"""Random access into a webdataset ``.tar`` shard: where each sample's files lie in the archive.

Indexing reads only the 512-byte member headers (``tarfile`` seeks over the data), so a resumed
stream can jump to any sample of a shard without reading, let alone decoding, the samples before
it. Samples follow webdataset's convention (``webdataset.tariterators.base_plus_ext``): a member
``dir/key.ext.more`` belongs to sample ``dir/key`` under the (lower-cased) suffix ``ext.more``, and
consecutive members with the same key form one sample.

A damaged archive is indexed as far as it can be read: a header that cannot be parsed ends the
index, a member whose data runs past the end of the file is dropped, and ``problems`` says what
was wrong, naming the shard, so that the reader can skip (and count) or refuse the lost samples.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field

SAMPLE_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@dataclass
class TarIndex:
    path: str
    keys: list[str] = field(default_factory=list)  # sample keys, in archive order
    members: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # suffix -> (offset, size)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


def index_tar(path: str | os.PathLike, name: str | None = None) -> TarIndex:
    """The index of one local tar file; ``name`` (e.g. the shard's path in storage) names it in
    ``problems``."""
    label = name or str(path)
    index = TarIndex(str(path))
    file_size = os.path.getsize(path)
    try:
        with tarfile.open(path, mode="r:") as archive:
            for info in _members(archive, index, label):
                _add_member(index, info, file_size, label)
    except tarfile.ReadError as e:  # not a tar at all, or a header unreadable from the start
        index.problems.append(f"{label}: not a readable tar archive ({e})")
    return index


def _members(archive: tarfile.TarFile, index: TarIndex, label: str):
    while True:
        try:
            info = archive.next()
        except (tarfile.TarError, EOFError, OSError) as e:  # truncated or corrupt past this point
            index.problems.append(f"{label}: archive unreadable after {len(index.keys)} samples ({e})")
            return
        if info is None:
            return
        if info.isfile():
            yield info


def _add_member(index: TarIndex, info: tarfile.TarInfo, file_size: int, label: str) -> None:
    match = SAMPLE_NAME.match(info.name)
    if match is None:  # no extension: not part of any sample (webdataset ignores it too)
        return
    key, suffix = match.group(1), match.group(2).lower()
    if info.offset_data + info.size > file_size:
        index.problems.append(f"{label}: {info.name} is cut off at the end of the archive")
        return
    if not index.keys or index.keys[-1] != key:
        index.keys.append(key)
        index.members.append({})
    index.members[-1][suffix] = (info.offset_data, info.size)


def read_member(handle, offset: int, size: int) -> bytes:
    """The bytes of one member from an open binary file (``os.pread``: no shared file position,
    so decode threads can read one handle at once)."""
    data = os.pread(handle.fileno(), size, offset)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
    return data
