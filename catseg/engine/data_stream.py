"""A training data stream that resumes exactly: sampler order and augmentations are functions
of (seed, global sample position), not of how long the process has been running.

detectron2's TrainingSampler draws an infinite shuffle from one generator, so a resumed run
restarts that stream from its beginning, and augmentations draw from whatever global RNG state
the worker has. Here sample position p (counted over all ranks; iteration i covers positions
i * batch .. (i + 1) * batch - 1) maps to dataset index perm_{seed, p // N}[p % N], and the
mapper runs with Python / NumPy / torch RNGs seeded from (seed, p). Resuming at iteration i only
needs `sampler.set_start_iter(i)` (the trainer calls it from the checkpoint's iteration).
"""
import hashlib
import itertools
import random
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from detectron2.data import build_detection_train_loader
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant mixing (seed, counter) pairs into one seed


def mix_seed(seed: int, counter: int) -> int:
    """A 63-bit seed from (seed, counter); distinct counters give unrelated streams."""
    digest = hashlib.sha256(f"{seed}:{counter}:{_MIX}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ResumableTrainingSampler(Sampler):
    """Infinite stream of (dataset index, sample seed) for this rank; the sample seed is
    mix_seed(seed, global sample position) and seeds that sample's augmentations.

    Positions start at `start_iter * total_batch_size + rank` and step by the world size, as
    detectron2's TrainingSampler shards its stream; within epoch e = p // size the order is
    the permutation drawn from mix_seed(seed, e) (identity without shuffle).
    """

    def __init__(self, size: int, total_batch_size: int, seed: int, shuffle: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        if size <= 0:
            raise ValueError("ResumableTrainingSampler needs a non-empty dataset")
        self.size = size
        self.total_batch_size = total_batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.start_position = 0

    def set_start_iter(self, start_iter: int) -> None:
        """Continue the stream at training iteration `start_iter` (before iteration begins)."""
        self.start_position = start_iter * self.total_batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """(size,) dataset indices of epoch `epoch`."""
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        """(dataset index, sample seed) pairs."""
        epoch, order = -1, None
        for position in itertools.count(self.start_position + self.rank, self.world_size):
            if position // self.size != epoch:
                epoch = position // self.size
                order = self.epoch_order(epoch)
            yield int(order[position % self.size]), mix_seed(self.seed, position)


class SeededMapDataset(Dataset):
    """dataset[(index, sample_seed)] = mapper(dicts[index]) with RNGs seeded from sample_seed.

    The global Python / NumPy / torch RNG states are restored afterwards, so the mapping does
    not disturb the training process's own random streams.
    """

    def __init__(self, dataset_dicts: List[dict], mapper: Callable[[dict], dict]):
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        index, sample_seed = key
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            torch.default_generator.manual_seed(sample_seed)
            out = self.mapper(self.dataset_dicts[index])
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
        if out is None:
            raise ValueError(f"the mapper dropped {self.dataset_dicts[index].get('file_name')}; "
                             "the resumable stream needs every sample")
        return out


def build_resumable_train_loader(dataset_dicts: List[dict], mapper, *, total_batch_size: int,
                                 seed: int, num_workers: int, shuffle: bool = True):
    """detectron2 train loader over the resumable stream (no aspect-ratio grouping, so batch i
    is exactly positions i * batch ..). Returns (loader, sampler)."""
    sampler = ResumableTrainingSampler(len(dataset_dicts), total_batch_size, seed, shuffle)
    loader = build_detection_train_loader(
        SeededMapDataset(dataset_dicts, mapper), mapper=None, sampler=sampler,
        total_batch_size=total_batch_size, aspect_ratio_grouping=False, num_workers=num_workers)
    return loader, sampler
