"""Lazy lists of input images and their stable split between processes.

An input spec is a file, a folder (its files with an image extension, not recursive), a glob
pattern, or a `.txt` file listing one path per line (relative paths are taken from the list's
folder; empty lines and lines starting with "#" are skipped). `iter_inputs` walks the specs one
entry at a time (os.scandir, glob.iglob, line by line), so listing a million paths holds one
path in memory, and no image is opened. Folder entries come in the file system's order, not
sorted: sorting would need the whole list in memory.

Paths are plain strings: no pathlib object (nor its parsing) per listed path.

`iter_blocks` splits the listing into blocks of consecutive inputs and deals them out to the
processes in turn (block k to process k modulo the world size). A block is also a unit of
batching (catseg/app/image_stream.py), so which images share a network pass does not depend
on the number of processes: the same inputs give the same float results (on the CPU: with the
same thread count), hence byte-identical labels, with 1 or N processes. The listing order must
be the same on every process and every restart: a list file's order, glob's and the file
system's directory order for an unchanged folder (on a network file system, the server's).
"""
import glob
import os
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

from ..image_io import IMAGE_EXTENSIONS

LIST_SUFFIX = ".txt"
T = TypeVar("T")


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


def iter_blocks(items: Iterable[T], block_size: int, rank: int = 0,
                world_size: int = 1) -> Iterator[List[Tuple[int, T]]]:
    """Blocks of `block_size` consecutive (index, item) pairs of `items`, those of process `rank`
    (block k goes to process k % world_size); only one block is held at a time."""
    block: List[Tuple[int, T]] = []
    for index, item in enumerate(items):
        block.append((index, item))
        if len(block) == block_size:
            if (index // block_size) % world_size == rank:
                yield block
            block = []
    if block and (block[0][0] // block_size) % world_size == rank:
        yield block
