"""SAM-refined labels ("Segment Anycat"): Segment Anything's automatic masks, labelled by CAT-Seg.

Each automatic mask takes the class of highest mean CAT-Seg probability over the mask's pixels;
masks are painted largest first, so where masks overlap the smaller one's class shows; pixels no
mask covers keep CAT-Seg's own label (equal areas: the later mask's class shows). The probabilities are not changed.
This needs every class's whole probability map (a labels-only result's top-k is not enough: a
mask's best mean need not be any pixel's top-k), so OpenVocabPredictor runs the full-probabilities
path for a refiner even with `output="labels"`, and reduces the result to the top-k afterwards.

SAM is optional (`pip install .[sam]`, the `segment-anything` package) and its weights are a
local file or a hub file (MODEL.SAM.WEIGHTS, or `--sam-weights` on the command lines; an `hf://`
name is downloaded first, catseg/weights/hub.py), never bundled: the SAM authors publish them
(facebookresearch/segment-anything, "Model Checkpoints": vit_h, vit_l, vit_b). The file is read by
catseg's one reader of weight files (weights only, nothing unpickled without restriction).
"""
import dataclasses
import os
from typing import Callable, List, Sequence

import numpy as np
import torch

from ..errors import CatsegError, ConfigError, WeightsError
from ..weights.files import read_checkpoint, state_dict_of

MaskGenerator = Callable[[np.ndarray], List[dict]]  # (h, w, 3) uint8 RGB -> [{"segmentation": (h, w) bool}, ...]


def refine_labels(probs: torch.Tensor, labels: torch.Tensor, masks: Sequence[np.ndarray]) -> torch.Tensor:
    """Labels refined by `masks` (see the module docstring).

    probs: (T, h, w) class probabilities; labels: (h, w) int64 CAT-Seg labels; masks: (h, w)
    bool arrays. Returns a new (h, w) int64 label map.
    """
    refined = labels.clone()
    for _, _, mask in sorted((-int(m.sum()), i, m) for i, m in enumerate(masks)):
        inside = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).to(labels.device)
        if inside.any():
            refined[inside] = probs[:, inside].mean(dim=1).argmax()
    return refined


class SamRefiner:
    """Segmentation -> Segmentation with SAM-refined labels; `generator` makes the masks."""

    def __init__(self, generator: MaskGenerator):
        self.generator = generator

    def __call__(self, result):
        if result.probs is None:
            raise ValueError("SAM refinement needs the whole probabilities: a labels-only result has none")
        masks = [m["segmentation"] for m in self.generator(result.image)]
        return dataclasses.replace(result, labels=refine_labels(result.probs, result.labels, masks))

    @classmethod
    def from_config(cls, cfg) -> "SamRefiner":
        """SAM of cfg.MODEL.SAM (TYPE, WEIGHTS, POINTS_PER_SIDE) on cfg.MODEL.DEVICE."""
        try:
            from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
        except ImportError:
            raise CatsegError("the SAM mode needs the segment-anything package: pip install .[sam]") from None
        sam_cfg = cfg.MODEL.SAM
        if not sam_cfg.WEIGHTS:
            raise ConfigError("the SAM mode needs SAM weights: set MODEL.SAM.WEIGHTS (or --sam-weights) to a local "
                              "checkpoint from github.com/facebookresearch/segment-anything (Model Checkpoints)")
        if sam_cfg.TYPE not in sam_model_registry:
            raise ConfigError(f"MODEL.SAM.TYPE {sam_cfg.TYPE!r}: expected one of {', '.join(sam_model_registry)}")
        if not os.path.isfile(sam_cfg.WEIGHTS):
            raise WeightsError(f"SAM weights file {sam_cfg.WEIGHTS} not found (MODEL.SAM.WEIGHTS)")
        state = state_dict_of(read_checkpoint(sam_cfg.WEIGHTS))
        try:
            sam = sam_model_registry[sam_cfg.TYPE]()
            sam.load_state_dict(state)
        except Exception as e:  # load_state_dict of a file that is not this SAM's checkpoint
            raise WeightsError(f"SAM weights file {sam_cfg.WEIGHTS} does not load as SAM {sam_cfg.TYPE} "
                               f"({type(e).__name__})") from e
        sam.to(cfg.MODEL.DEVICE).eval()
        return cls(SamAutomaticMaskGenerator(sam, points_per_side=sam_cfg.POINTS_PER_SIDE).generate)
