"""Any-size input for multi-scale backbones: pad to the deepest stride, crop each output back.

An input of H x W is zero-padded at the bottom/right to multiples of ``size_divisibility``
(the largest output stride), the network runs on the padded image, and every output of
stride s is cropped to ceil(H / s) x ceil(W / s) — the size an image of H x W has at stride s.
Since ceil(H / s) <= ceil(H / d) * d / s for every stride s dividing d, no output needs more
than the padded image gives. Zero padding is the normalised image's mean colour.
"""
import math
from typing import Dict

import torch
from detectron2.modeling import Backbone

from ...padding import pad_to_multiple


def crop_to_input(features: Dict[str, torch.Tensor], strides: Dict[str, int], size) -> Dict[str, torch.Tensor]:
    """Crop each (B, C, h, w) feature of stride s to (B, C, ceil(H / s), ceil(W / s)) for size (H, W)."""
    h, w = size
    return {k: v[..., : math.ceil(h / strides[k]), : math.ceil(w / strides[k])] for k, v in features.items()}


class PaddedBackbone(Backbone):
    """A detectron2 Backbone whose ``forward`` accepts any size; subclasses implement
    ``forward_padded`` for inputs whose sides are multiples of ``size_divisibility`` and set
    ``_out_features``, ``_out_feature_strides``, ``_out_feature_channels``."""

    @property
    def size_divisibility(self) -> int:
        return max(self._out_feature_strides.values())

    def forward_padded(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised images -> {name: (B, C_name, ceil(H / s), ceil(W / s))}."""
        features = self.forward_padded(pad_to_multiple(x, self.size_divisibility))
        return crop_to_input(features, self._out_feature_strides, x.shape[-2:])
