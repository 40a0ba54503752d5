"""Labels-only inference output: the per-pixel argmax and top-k of class scores, computed class
chunk by class chunk, so that the (T, H, W) probabilities are never held whole.

`RunningTopK` keeps, per pixel, the k best (score, class id) pairs seen so far, best first; each
new chunk of class scores is merged in with k passes of argmax over (kept k + chunk) candidates. Chunks
must come in ascending class-id order (every id of a chunk above every id merged before), so that
among equal scores the lower class id comes first: the labels are exactly `probs.argmax(0)`
(torch's first index among ties), the scores exactly `probs.topk(k, dim=0).values` and the ids
exactly those of a stable descending sort, `probs.sort(0, descending=True, stable=True)`.

A class that the model writes as a constant map (a CVPR'24 class no sliding-window view selected,
see meta_arch.unselected_classes) need not be computed: all such classes tie everywhere, so only
the k lowest of their ids can be in the top k, and `top_k_over_chunks` merges those as constant
candidates, each at its place in the id order.
"""
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .chunking import chunk_slices


class RunningTopK:
    """Per-pixel top-k of class scores fed chunk by chunk in ascending class-id order.

    `scores` (k', H, W) and `classes` (k', H, W) int64 hold the best k' = min(k, classes seen)
    candidates, best first, lower id first among equal scores.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        self.k = k
        self.scores: Optional[torch.Tensor] = None
        self.classes: Optional[torch.Tensor] = None
        self.next_id = 0  # every id merged from now on must be at least this

    def add(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Merge (c, H, W) `scores` of the classes `ids` ((c,) int64, ascending, each above every
        id merged before)."""
        ids = ids.to(device=scores.device, dtype=torch.int64)
        if len(ids) != len(scores):
            raise ValueError(f"{len(scores)} score maps for {len(ids)} class ids")
        if len(ids) == 0:
            return
        if int(ids[0]) < self.next_id or (len(ids) > 1 and bool((ids[1:] <= ids[:-1]).any())):
            raise ValueError("class chunks must come in ascending class-id order")
        self.next_id = int(ids[-1]) + 1
        kept = 0 if self.scores is None else len(self.scores)
        # candidates: the kept ones first (their ids are all lower), then the chunk's in id order, so
        # that argmax's first index among equal scores is the lowest class id
        candidates = torch.cat([self.scores, scores]) if kept else scores.clone()
        best, order = [], []
        for _ in range(min(self.k, len(candidates))):  # k passes of argmax: linear in the chunk size
            pos = candidates.argmax(dim=0, keepdim=True)
            order.append(pos)
            best.append(candidates.gather(0, pos))
            candidates.scatter_(0, pos, float("-inf"))  # probabilities are >= 0: never chosen again
        del candidates
        order = torch.cat(order)
        new = ids[(order - kept).clamp_(min=0)]  # the class id of each chosen candidate of this chunk
        self.classes = new if not kept else torch.where(order < kept, self.classes.gather(
            0, order.clamp(max=kept - 1)), new)
        self.scores = torch.cat(best)

    def output(self) -> Dict[str, torch.Tensor]:
        """{"sem_seg_labels": (H, W) int64, "sem_seg_topk_scores": (k, H, W) float32,
        "sem_seg_topk_classes": (k, H, W) int64} (k: at most the number of classes)."""
        return {"sem_seg_labels": self.classes[0], "sem_seg_topk_scores": self.scores.float(),
                "sem_seg_topk_classes": self.classes}


def top_k_over_chunks(fn: Callable[[slice], torch.Tensor], ids: torch.Tensor, chunk: int, k: int,
                      size: Sequence[int], constant: Optional[float] = None,
                      constant_ids: Optional[torch.Tensor] = None, merge_chunk: Optional[int] = None) -> RunningTopK:
    """Running top-k of the classes `ids` ((n,) int64 ascending) over chunks of at most `chunk`
    of them: fn(s) gives the (c, *size) float32 scores of the classes ids[s] (`s` a slice of
    positions in `ids`), merged into the top-k `merge_chunk` classes at a time (default: `chunk`).
    With `constant`, the classes `constant_ids` ((m,) ascending, disjoint from `ids`), whose
    score is `constant` everywhere, are merged without being computed.

    Tied constant classes rank by id, so at most the k lowest of `constant_ids` can be in the
    top k; each is merged as a one-class constant chunk at its own place in the id order (the
    scores of a chunk of `ids` that straddles one are merged in two parts).

    The chunks given to `fn` do not depend on k, `merge_chunk` or the constants: the same as a
    caller that computes all scores with `chunk` gets (floating-point kernels may round a class
    differently in chunks of other sizes; this way the top-k is exactly that of those scores).
    """
    top = RunningTopK(k)
    pending: List[int] = [] if constant is None or constant_ids is None else constant_ids[:k].tolist()
    merge_chunk = merge_chunk or chunk

    def merge_constants_below(limit: Optional[int]) -> None:
        while pending and (limit is None or pending[0] < limit):
            top.add(torch.full((1, *size), constant, dtype=torch.float32, device=ids.device),
                    torch.tensor([pending.pop(0)], device=ids.device))

    for s in chunk_slices(len(ids), chunk):
        scores, part = fn(s), ids[s]
        bounds = [0, len(part)]
        cuts = [c for c in pending if int(part[0]) < c < int(part[-1])]
        if cuts:  # merge in parts split at every pending constant id inside this chunk
            bounds[1:1] = torch.searchsorted(part, torch.tensor(cuts, device=part.device)).tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for piece in chunk_slices(hi - lo, merge_chunk):
                piece = slice(lo + piece.start, lo + piece.stop)
                merge_constants_below(int(part[piece.start]))
                top.add(scores[piece], part[piece])
        del scores
    merge_constants_below(None)
    return top
