"""The batched image pipeline of `OpenVocabPredictor.segment_many` and `catseg-label`.

    inputs --(blocks of consecutive inputs, dealt out to the processes)-->
           --(DataLoader workers: skip check, decode, downscale, one block each in turn)-->
           --(size_batches: a block's images sorted by size, cut into batches)--> network

`ImageStream` is a torch IterableDataset over blocks of `block_size` consecutive inputs
(catseg/app/input_stream.py: block k belongs to process k modulo the world size). Worker w of
W loads the process's blocks j with j modulo W = w, and the DataLoader takes one block from
each worker in turn, so blocks arrive in input order while up to 2 x W blocks are decoded
beside the network (`prefetch_factor` 2). With 0 workers the same code runs in the calling
process. An input that cannot be read becomes an item with its `error` (one line); one that
`should_load` refuses (e.g. already labelled) an item with `skipped` set, decoded never.

Within a block, images are sorted by size and cut into batches of `batch_size` (the model
pads and resizes each image on its own, so a batch of mixed sizes is fine too). The batches are
thus a function of the input list alone — not of the number of processes or workers — and so
are the float results: labels are byte-identical whatever the launch. Memory is bounded by the
blocks in flight, never by the number of inputs.
"""
import ctypes
import os
import signal
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..image_io import ImageReadError, load_image
from .input_stream import iter_blocks

BLOCK_BATCHES = 4  # a block holds this many batches: the window in which sizes are grouped
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class Item:
    """One input on its way through the pipeline.

    index: position in the input stream; key: the caller's name for it (e.g. the path);
    rgb: (h, w, 3) uint8 RGB as the network sees it; size: (H, W) of the input;
    error: one-line reason it could not be read; skipped: refused by `should_load`.
    """

    index: int
    key: object
    rgb: Optional[np.ndarray] = None
    size: Optional[Tuple[int, int]] = None
    error: str = ""
    skipped: bool = False

    @property
    def ready(self) -> bool:
        return self.rgb is not None


class ImageStream(IterableDataset):
    """Blocks (lists of Items) of `inputs`, an iterable of (key, image input) — file paths, PIL
    images or arrays — for process `rank` of `world_size`.

    `inputs` is iterated once per worker, so with workers it must be re-iterable (a list, or an
    object whose __iter__ lists lazily). `should_load(key)` False marks an item skipped without
    reading it. `max_side` and `format` as in catseg.image_io.load_image.
    """

    def __init__(self, inputs: Iterable[Tuple[object, object]], block_size: int, rank: int = 0, world_size: int = 1,
                 max_side: int = 0, format: str = "RGB", should_load: Optional[Callable[[object], bool]] = None):
        self.inputs, self.block_size, self.rank, self.world_size = inputs, block_size, rank, world_size
        self.max_side, self.format, self.should_load = max_side, format, should_load

    def __iter__(self) -> Iterator[List[Item]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        blocks = iter_blocks(self.inputs, self.block_size, self.rank, self.world_size)
        for j, block in enumerate(blocks):
            if j % workers == worker:
                yield [self.load(index, key, image) for index, (key, image) in block]

    def load(self, index: int, key, image) -> Item:
        if self.should_load is not None and not self.should_load(key):
            return Item(index, key, skipped=True)
        try:
            rgb, size = load_image(image, self.format, self.max_side)
        except (ImageReadError, OSError) as e:
            return Item(index, key, error=one_line(e))
        return Item(index, key, rgb=rgb, size=tuple(size))


def one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def pass_through(block):
    """The DataLoader's collate function: blocks go through untouched (module level: picklable)."""
    return block


class DieWithParent:
    """DataLoader worker start-up (`worker_init_fn`): the worker is killed when the process that
    started it dies (Linux prctl PR_SET_PDEATHSIG). Otherwise a labelling process killed by a
    signal leaves its workers behind, blocked on a full queue.

    Made in the parent, it remembers the parent's pid: a parent that died between the fork and
    the prctl sends no signal (and PyTorch's own watchdog, started later in the worker, would
    take the new parent for the loader), so then the worker exits at once."""

    def __init__(self):
        self.parent = os.getpid()

    def __call__(self, _worker_id: int) -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:  # not glibc: PyTorch's own check of the parent remains
            return
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.parent:
            os._exit(1)


def stream_blocks(stream: ImageStream, num_workers: int) -> Iterable[List[Item]]:
    """The stream's blocks in input order, decoded by `num_workers` DataLoader workers (0: here)."""
    if num_workers <= 0:
        return iter(stream)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=pass_through,
                      worker_init_fn=DieWithParent())


def size_batches(items: List[Item], batch_size: int) -> List[List[Item]]:
    """The decoded `items` sorted by (size, index), cut into batches of up to `batch_size`."""
    ready = sorted((item for item in items if item.ready), key=lambda item: (item.rgb.shape, item.index))
    return [ready[i:i + batch_size] for i in range(0, len(ready), batch_size)]


def segmented(predictor, stream: ImageStream, num_workers: int = 0) -> Iterator[Tuple[Item, Optional[object]]]:
    """(item, Segmentation) for every decoded item, (item, None) for skipped and unreadable ones,
    block by block (within a block: by size; see `in_input_order`). `predictor`: an
    OpenVocabPredictor."""
    for block in stream_blocks(stream, num_workers):
        yield from ((item, None) for item in block if not item.ready)
        for batch in size_batches(block, predictor.batch_size):
            yield from zip(batch, predictor.run([(item.rgb, item.size) for item in batch]))


def in_input_order(pairs: Iterable[Tuple[Item, object]]) -> Iterator[Tuple[Item, object]]:
    """`pairs` re-ordered by item index; holds only those that arrive ahead of their turn."""
    waiting: Dict[int, Tuple[Item, object]] = {}
    next_index = 0
    for item, result in pairs:
        waiting[item.index] = (item, result)
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1
