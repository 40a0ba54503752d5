"""D2Twins: timm's Twins-SVT and Twins-PCPVT (Chu et al., NeurIPS 2021) as a detectron2 backbone.

MODEL.TWINS.NAME picks the timm architecture (``twins_svt_{small,base,large}`` or
``twins_pcpvt_{small,base,large}``, optionally "arch.tag"); both families have four stages at
strides 4, 8, 16, 32, exposed as res2..res5 with the stage widths as channels. Stages after
the deepest requested output are removed (no parameters without gradient); the last kept stage
goes through the network's final LayerNorm only when it is the fourth (where timm applies it).

Any input size: the image is padded to a multiple of 32 and outputs are cropped back to
ceil(input / stride) (``padded.py``). 32 (not just the deepest requested stride) keeps every
stage at least as large as its sub-sampled attention's kernel (SR ratios 8, 4, 2 at strides
4, 8, 16); SVT's locally-grouped windows pad themselves inside timm.

Weights: MODEL.TWINS.PRETRAINED downloads timm's weights for NAME; MODEL.TWINS.WEIGHTS loads a
local checkpoint in timm's key layout (``patch_embeds.0.proj.weight`` ...) or D2Twins' own
(``twins.*``).
"""
from typing import Dict, List

import timm
import torch
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY
from timm.models.twins import Twins

from ...weights.backbone import load_backbone_checkpoint
from .padded import PaddedBackbone

_NAMES = ("res2", "res3", "res4", "res5")


def build_timm_twins(name: str, pretrained: bool, overrides: Dict) -> Twins:
    """A timm Twins (SVT or PCPVT) without classifier."""
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="", **overrides)
    if not isinstance(model, Twins):
        raise ValueError(f"{name} is a {type(model).__name__}, not a timm Twins")
    return model


@BACKBONE_REGISTRY.register()
class D2Twins(PaddedBackbone):
    """Twins stages as {res2..res5: (B, C_i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2)))}."""

    @configurable
    def __init__(self, twins: Twins, out_features: List[str], weights: str = "", strict: bool = False):
        super().__init__()
        self._out_features = sorted(out_features, key=_NAMES.index)
        self._out_feature_strides = {k: 4 * 2 ** _NAMES.index(k) for k in out_features}
        self._out_feature_channels = {k: twins.embed_dims[_NAMES.index(k)] for k in out_features}
        self._indices = [_NAMES.index(k) for k in out_features]
        self._last_norm = max(self._indices) == len(twins.blocks) - 1
        twins.prune_intermediate_layers(self._indices, prune_norm=not self._last_norm)
        self.twins = twins
        if weights:
            self.load_weights(weights, strict)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.TWINS
        overrides = {"drop_path_rate": c.DROP_PATH_RATE}
        for key, value in (("embed_dims", c.EMBED_DIMS), ("depths", c.DEPTHS), ("num_heads", c.NUM_HEADS)):
            if value:
                overrides[key] = list(value)
        return {
            "twins": build_timm_twins(c.NAME, c.PRETRAINED, overrides),
            "out_features": c.OUT_FEATURES,
            "weights": c.WEIGHTS,
            "strict": cfg.MODEL.CHECKPOINT_STRICT,
        }

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward_padded(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps = self.twins.forward_intermediates(x, self._indices, norm=self._last_norm, intermediates_only=True)
        return dict(zip(self._out_features, maps))

    def load_weights(self, path: str, strict: bool = False):
        """Load a timm-layout or D2Twins-layout checkpoint; returns the report."""
        return load_backbone_checkpoint(self, path, prefixes=("twins.",), strict=strict)
