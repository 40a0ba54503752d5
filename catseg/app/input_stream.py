"""Lazy lists of input images and their stable split between processes.

An input spec is a file, a folder (its files with an image extension, not recursive), a glob
pattern, or a `.txt` file listing one path per line (relative paths are taken from the list's
folder; empty lines and lines starting with "#" are skipped). `iter_inputs` walks the specs one
entry at a time (os.scandir, glob.iglob, line by line), so listing a million paths holds one
path in memory, and no image is opened. Folder entries come in the file system's order, not
sorted: sorting would need the whole list in memory.

Paths are plain strings (pathlib interns every path component it parses, a table that would
grow with the number of inputs).

`in_shard` splits by a hash of the path string (CRC-32 modulo the number of processes): the
same path always goes to the same process for a given world size, whatever the listing order,
so a restart with the same inputs and processes gives the same split.
"""
import glob
import os
import zlib
from typing import Iterable, Iterator, List, Optional, Sequence

from ..image_io import IMAGE_EXTENSIONS

LIST_SUFFIX = ".txt"


def iter_folder(folder: str) -> Iterator[str]:
    """The files of `folder` with an image extension, in directory order."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                yield os.path.join(folder, entry.name)


def iter_list_file(list_file: str) -> Iterator[str]:
    """The paths listed in a .txt file, one per line, relative ones from the file's folder."""
    folder = os.path.dirname(list_file)
    with open(list_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield os.path.join(folder, line)


def iter_spec(spec: str) -> Iterator[str]:
    """The paths one input spec stands for (see the module docstring)."""
    if os.path.isdir(spec):
        yield from iter_folder(spec)
    elif os.path.isfile(spec):
        yield from iter_list_file(spec) if spec.lower().endswith(LIST_SUFFIX) else [spec]
    else:
        yield from (m for m in glob.iglob(spec, recursive=True) if os.path.isfile(m))


def iter_inputs(specs: Sequence[str], unmatched: Optional[List[str]] = None) -> Iterator[str]:
    """Every path of `specs`, lazily; specs that give nothing are appended to `unmatched`."""
    for spec in specs:
        count = 0
        for path in iter_spec(spec):
            count += 1
            yield path
        if count == 0 and unmatched is not None:
            unmatched.append(spec)


def in_shard(path: str, rank: int, world_size: int) -> bool:
    """Whether process `rank` of `world_size` takes `path` (stable hash of the path string)."""
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) % world_size == rank


def iter_shard(paths: Iterable[str], rank: int, world_size: int) -> Iterator[str]:
    """The paths of `paths` that process `rank` takes."""
    return (p for p in paths if in_shard(p, rank, world_size))
