"""Test-time augmentation (TEST.AUG), as in the official CAT-Seg evaluation.

detectron2's DatasetMapperTTA makes the augmented copies of an input: the image resized so its
short side is each of TEST.AUG.MIN_SIZES (long side at most TEST.AUG.MAX_SIZE), each also
flipped horizontally when TEST.AUG.FLIP. Every copy runs the wrapped model's normal inference
(whole image or sliding window, as configured) with the input's own (height, width), so its
probabilities come back at the original size; flipped ones are flipped back and all are
averaged.

Averaging needs every copy's whole (T, height, width) probabilities, so test-time augmentation
always takes the full-probabilities path of the model; a "labels" output (TEST.OUTPUT, see
CATSeg.forward) is then the argmax and top-k of the averaged probabilities.
"""
from typing import Dict, List, Optional

import torch
from detectron2.data.transforms import HFlipTransform
from detectron2.modeling import DatasetMapperTTA
from torch import nn

from .chunking import top_k_bytes_per_class
from .top_classes import top_k_over_chunks


class CATSegWithTTA(nn.Module):
    """Wraps a CATSeg model for inference: [{"image", "height", "width"}] -> [{"sem_seg": (T, height, width)}]."""

    def __init__(self, cfg, model: nn.Module):
        super().__init__()
        self.model = model
        self.tta_mapper = DatasetMapperTTA(cfg)

    def augmented_inputs(self, x: Dict) -> List[Dict]:
        """The augmented copies of one input, each with its "transforms"."""
        image = x["image"]
        height, width = x.get("height", image.shape[-2]), x.get("width", image.shape[-1])
        return self.tta_mapper({**x, "height": height, "width": width})

    def forward(self, batched_inputs: List[Dict], output: Optional[str] = None,
                topk: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
        """`output` / `topk`: as in CATSeg.forward (default: the wrapped model's)."""
        assert not self.model.training, "test-time augmentation is for inference"
        output = self.model.output if output is None else output
        topk = self.model.topk if topk is None else topk
        results = []
        for x in batched_inputs:
            probs = self.average(x)
            if output == "labels":  # the same running top-k, over the averaged probabilities
                ids = torch.arange(len(probs), device=probs.device)
                chunk = self.model.budget.items(len(probs), top_k_bytes_per_class(probs.shape[1:]), probs.device)
                results.append(top_k_over_chunks(lambda s: probs[s], ids, chunk, topk, probs.shape[1:]).output())
            else:
                results.append({"sem_seg": probs})
        return results

    def average(self, x: Dict) -> torch.Tensor:
        """(T, height, width) mean of the copies' probabilities, flips undone."""
        total = None
        copies = self.augmented_inputs(x)
        for copy in copies:
            probs = self.model([copy], output="probs")[0]["sem_seg"]
            if any(isinstance(t, HFlipTransform) for t in copy["transforms"].transforms):
                probs = probs.flip(-1)
            total = probs if total is None else total + probs
        return total / len(copies)
