"""The batched image pipeline of `OpenVocabPredictor.segment_many` and `catseg-label`.

    inputs --(DataLoader workers: skip check, decode, downscale)--> items in input order
           --(SizeBatcher: same-size images together)--> network batches --> results

`ImageStream` is a torch IterableDataset: worker w of W takes the items whose index is w modulo
W, and the DataLoader fetches from the workers in turn, so items arrive in input order while
up to 2 x W images are being decoded beside the network (`prefetch_factor` 2). With 0 workers
the same code runs in the calling process. An input that cannot be read becomes an item with
its `error` (one line); one that `should_load` refuses (e.g. already labelled) an item with
`skipped` set, decoded never.

`SizeBatcher` holds at most `window` decoded images: a batch leaves as soon as `batch_size`
images of one size are waiting; when the window is full, the oldest images leave together
whatever their sizes (the model pads and resizes each image on its own, so a mixed batch gives
each image what it gets alone). Memory is therefore bounded by the window and the prefetch,
never by the number of inputs.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..image_io import ImageReadError, load_image

WINDOW_BATCHES = 4  # SizeBatcher window, in batches


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
    """Items of `inputs`, an iterable of (key, image input) — file paths, PIL images or arrays.

    `inputs` is iterated once per worker, so with workers it must be re-iterable (a list, or an
    object whose __iter__ lists lazily). `should_load(key)` False marks an item skipped without
    reading it. `max_side` and `format` as in catseg.image_io.load_image.
    """

    def __init__(self, inputs: Iterable[Tuple[object, object]], max_side: int = 0, format: str = "RGB",
                 should_load: Optional[Callable[[object], bool]] = None):
        self.inputs, self.max_side, self.format, self.should_load = inputs, max_side, format, should_load

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, (key, image) in enumerate(self.inputs):
            if index % workers == worker:
                yield self.load(index, key, image)

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


def pass_through(item):
    """The DataLoader's collate function: items go through untouched (module level: picklable)."""
    return item


def stream_items(stream: ImageStream, num_workers: int) -> Iterable[Item]:
    """The stream's items in input order, decoded by `num_workers` DataLoader workers (0: here)."""
    if num_workers <= 0:
        return iter(stream)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=pass_through)


class SizeBatcher:
    """Groups decoded items into batches of up to `batch_size`, same sizes together (see the
    module docstring); at most `window` items wait."""

    def __init__(self, batch_size: int, window: int):
        self.batch_size, self.window = batch_size, max(window, batch_size)
        self.pending: List[Item] = []

    def add(self, item: Item) -> List[List[Item]]:
        """Take `item`; returns the batches ready now."""
        self.pending.append(item)
        same = [p for p in self.pending if p.rgb.shape == item.rgb.shape]
        if len(same) >= self.batch_size:
            return [self.take(same[:self.batch_size])]
        if len(self.pending) >= self.window:
            return [self.take(self.pending[:self.batch_size])]
        return []

    def flush(self) -> List[List[Item]]:
        """The waiting items as batches: full same-size groups first, then the rest in order."""
        batches = []
        for shape in dict.fromkeys(p.rgb.shape for p in self.pending):
            same = [p for p in self.pending if p.rgb.shape == shape]
            while len(same) >= self.batch_size:
                batches.append(self.take(same[:self.batch_size]))
                same = same[self.batch_size:]
        while self.pending:
            batches.append(self.take(self.pending[:self.batch_size]))
        return batches

    def take(self, batch: List[Item]) -> List[Item]:
        chosen = {id(p) for p in batch}
        self.pending = [p for p in self.pending if id(p) not in chosen]
        return batch


def segmented(predictor, stream: ImageStream, num_workers: int = 0) -> Iterator[Tuple[Item, Optional[object]]]:
    """(item, Segmentation) for every decoded item, (item, None) for skipped and unreadable ones,
    in completion order (see `in_input_order`). `predictor`: an OpenVocabPredictor."""
    batcher = SizeBatcher(predictor.batch_size, WINDOW_BATCHES * predictor.batch_size)

    def run(batch: List[Item]):
        results = predictor.run([(item.rgb, item.size) for item in batch])
        return zip(batch, results)

    for item in stream_items(stream, num_workers):
        if not item.ready:
            yield item, None
            continue
        for batch in batcher.add(item):
            yield from run(batch)
    for batch in batcher.flush():
        yield from run(batch)


def in_input_order(pairs: Iterable[Tuple[Item, object]]) -> Iterator[Tuple[Item, object]]:
    """`pairs` re-ordered by item index; holds only those that arrive ahead of their turn."""
    waiting: Dict[int, Tuple[Item, object]] = {}
    next_index = 0
    for item, result in pairs:
        waiting[item.index] = (item, result)
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1

