"""Chunked evaluation under a memory budget: one budget object and named activation estimates.

At inference the aggregator runs its class-independent stages over chunks of classes and its
class attention over chunks of positions, and the sliding-window merge runs over chunks of
classes, so that peak memory follows a budget at any vocabulary size. `ChunkBudget` holds the
three settings (MODEL.SEM_SEG_HEAD.MEMORY_BUDGET_MB, CPU_CHUNK_MB, CLASS_CHUNK_SIZE); the model
keeps one instance, shared by the meta-architecture and the aggregator. The `*_bytes` functions
estimate the fp32 activation bytes of one chunk item and name the tensors they count.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

FLOAT_BYTES = 4  # estimates are for fp32 activations


@dataclass
class ChunkBudget:
    """Memory budget of chunked inference.

    memory_mb: activation budget of one chunk, in MB.
    cpu_mb: on CPU, chunks also stay under this many MB (> 0). Small chunks are faster there:
        their temporaries stay in cache, and below glibc's mmap threshold (32 MB at most) freed
        memory is reused instead of being mapped and faulted in again.
    class_chunk: a fixed number of classes per chunk in the spatial blocks and the decoder
        (0: from the budget).
    """

    memory_mb: float = 1024
    cpu_mb: float = 0
    class_chunk: int = 0

    @classmethod
    def from_config(cls, cfg) -> "ChunkBudget":
        head = cfg.MODEL.SEM_SEG_HEAD
        return cls(head.MEMORY_BUDGET_MB, head.CPU_CHUNK_MB, head.CLASS_CHUNK_SIZE)

    def megabytes(self, device: torch.device) -> float:
        """MB one chunk may use on `device`."""
        if device.type == "cpu" and self.cpu_mb > 0:
            return min(self.memory_mb, self.cpu_mb)
        return self.memory_mb

    def items(self, total: int, bytes_per_item: int, device: torch.device) -> int:
        """Items per chunk so that one chunk (`bytes_per_item` each) stays within the budget;
        at least 1, at most `total`."""
        return chunk_size(total, bytes_per_item, self.megabytes(device))

    def classes(self, total: int, bytes_per_class: int, device: torch.device) -> int:
        """Classes per chunk: `class_chunk` when set, else from the budget."""
        if self.class_chunk:
            return min(self.class_chunk, total)
        return self.items(total, bytes_per_class, device)


def chunk_size(total: int, bytes_per_item: int, budget_mb: float) -> int:
    """Items per chunk so that a chunk (`bytes_per_item` each) stays within `budget_mb`; 1..total."""
    return max(1, min(total, int(budget_mb * 2 ** 20 // max(1, bytes_per_item))))


def chunk_slices(total: int, size: int) -> List[slice]:
    """Consecutive slices of at most `size` covering range(total)."""
    return [slice(i, min(i + size, total)) for i in range(0, total, max(1, size))]


def over_chunks(fn: Callable[[slice], torch.Tensor], total: int, size: int, dim: int = 1,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Concatenation along `dim` of fn(s) over `chunk_slices(total, size)`, written chunk by chunk
    into `out` (allocated from the first chunk when None; with autograd and no `out`, torch.cat);
    one chunk returns fn's result as is.

    `out` may be the tensor fn reads from, as long as fn reads its own slice only.
    """
    slices = chunk_slices(total, size)
    if len(slices) == 1 and out is None:
        return fn(slices[0])
    if out is None and torch.is_grad_enabled():  # autograd: concatenation's backward is views
        return torch.cat([fn(s) for s in slices], dim=dim)
    for s in slices:
        y = fn(s)
        if out is None:
            out = y.new_empty(y.shape[:dim] + (total,) + y.shape[dim + 1:])
        out[(slice(None),) * dim + (s,)] = y
    return out


def spatial_bytes_per_class(h: int, w: int, prompt_channels: int, hidden: int) -> int:
    """One class of one view in the spatial blocks: the P-channel cost slice plus a dozen live
    (h, w, hidden)-sized tensors (window-ordered input, LayerNorm, q / k / v, attention output,
    projection, residual, and the 4x-wide MLP hidden layer counted as four)."""
    return FLOAT_BYTES * h * w * (prompt_channels + 12 * hidden)


def embedding_bytes_per_class(h: int, w: int, prompt_channels: int, hidden: int) -> int:
    """One class of one view in the cost embedding: its P-channel cost slice and the (h, w, hidden)
    output of the embedding convolution."""
    return FLOAT_BYTES * h * w * (prompt_channels + hidden)


def selection_bytes_per_class(views: int, prompt_channels: int, h: int, w: int, channels: int) -> int:
    """One class of the class selection (CLASS_PAD_LENGTH): its normalised text embeddings
    (views, P, C) and their (views, P, h, w) cosine maps."""
    return FLOAT_BYTES * views * prompt_channels * (h * w + channels)


def decoder_bytes_per_class(h: int, w: int, hidden: int, channels: Sequence[int]) -> int:
    """One class of one view in the decoder: per stage, its input and its four-phase fused
    convolution output (4 x C_out channels), both counted at the stage's output resolution
    (4x the input's pixels; the interleaved output and the GroupNorm temporaries fit in that)."""
    total, c_in, scale = 0, hidden, 4
    for c_out in channels:
        total += scale * h * w * (c_in + 4 * c_out)
        c_in, scale = c_out, scale * 4
    return FLOAT_BYTES * total


def class_attention_bytes_per_position(views: int, classes: int, hidden: int) -> int:
    """One pooled position of the class attention: 16 (views, classes, hidden) rows (the moved
    input, LayerNorm, q / k / v, feature maps, output, and the 4x-wide MLP hidden layer)."""
    return FLOAT_BYTES * views * classes * 16 * hidden


def sliding_merge_bytes_per_class(views: int, kernel: int, out_res: Sequence[int], out_size: Sequence[int]) -> int:
    """One class of the sliding-window merge: the views' upsampled logits and probabilities
    (2 x views x kernel^2), the folded map, the overlap count and the global view at out_res
    (3 x out_res), and the final (height, width) map."""
    return FLOAT_BYTES * (2 * views * kernel * kernel + 3 * out_res[0] * out_res[1] + out_size[0] * out_size[1])


def top_k_bytes_per_class(out_size: Sequence[int]) -> int:
    """One class of a labels-only merge (catseg/modeling/top_classes.py), beside the class's own
    (height, width) map: the merge's copy of the candidates' scores (its other temporaries are
    k maps, not per class)."""
    return FLOAT_BYTES * out_size[0] * out_size[1]


def postprocess_bytes_per_class(out_size: Sequence[int]) -> int:
    """One class of whole-image post-processing: its (height, width) probability map."""
    return FLOAT_BYTES * out_size[0] * out_size[1]
