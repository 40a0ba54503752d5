"""D2ViT: a plain timm ViT made multi-scale with a ViTDet-style simple feature pyramid.

The ViT (``timm.models.vision_transformer.VisionTransformer``, any architecture timm names,
e.g. ``vit_base_patch16_384``) runs once on the image and yields one map at its patch stride
(16 for the ``patch16`` models). The pyramid builds every requested output from that single map
(Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", 2022):

    res2 (stride 4):  deconv 2x2/2 -> LayerNorm -> GELU -> deconv 2x2/2   (C -> C/2 -> C/4)
    res3 (stride 8):  deconv 2x2/2                                        (C -> C/2)
    res4 (stride 16): identity                                            (C)
    res5 (stride 32): max-pool 2x2/2                                      (C)

each followed by 1x1 conv -> LayerNorm -> 3x3 conv -> LayerNorm to OUT_CHANNELS.
Strides are relative to the patch size: stride(res4) = patch size.

Any input size: position embeddings are resampled to the token grid on every forward
(timm's ``dynamic_img_size``; bicubic from the IMG_SIZE grid); the image is padded to a
multiple of the deepest stride and every output is cropped to ceil(input / stride)
(see ``padded.py``).

Weights: MODEL.VIT.PRETRAINED downloads timm's weights for MODEL.VIT.NAME ("arch" or
"arch.tag"); MODEL.VIT.WEIGHTS then loads a local checkpoint in timm's key layout (keys of the
ViT alone, e.g. ``blocks.0.attn.qkv.weight``; the position embedding is resampled if its grid
differs) or in D2ViT's own (``vit.*`` and ``pyramid.*``).
"""
from typing import Dict, List

import timm
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.layers.batch_norm import LayerNorm
from detectron2.modeling import BACKBONE_REGISTRY
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from ...weights.backbone import load_backbone_checkpoint
from .padded import PaddedBackbone

# Output name -> scale relative to the ViT's patch stride (log2).
_LEVELS = {"res2": -2, "res3": -1, "res4": 0, "res5": 1}


def pyramid_level(dim: int, log2_scale: int) -> nn.Sequential:
    """Resampling of the (B, dim, h, w) ViT map by 2 ** log2_scale; returns the module (its
    output channels are ``level_channels(dim, log2_scale)``)."""
    if log2_scale == -2:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
            LayerNorm(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
        )
    if log2_scale == -1:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2))
    if log2_scale == 0:
        return nn.Sequential()
    if log2_scale == 1:
        return nn.Sequential(nn.MaxPool2d(2, stride=2))
    raise ValueError(f"no pyramid level for scale 2**{log2_scale}")


def level_channels(dim: int, log2_scale: int) -> int:
    """Channels after ``pyramid_level(dim, log2_scale)``."""
    return dim // 4 if log2_scale == -2 else dim // 2 if log2_scale == -1 else dim


def output_projection(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv -> LN -> 3x3 conv -> LN, (B, in, h, w) -> (B, out, h, w)."""
    return nn.Sequential(
        Conv2d(in_channels, out_channels, 1, bias=False, norm=LayerNorm(out_channels)),
        Conv2d(out_channels, out_channels, 3, padding=1, bias=False, norm=LayerNorm(out_channels)),
    )


def build_timm_vit(name: str, pretrained: bool, img_size: int, overrides: Dict) -> VisionTransformer:
    """A timm ViT without classifier, with position embeddings resampled per input size."""
    model = timm.create_model(
        name,
        pretrained=pretrained,
        num_classes=0,
        global_pool="",
        img_size=img_size,
        dynamic_img_size=True,
        **overrides,
    )
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


@BACKBONE_REGISTRY.register()
class D2ViT(PaddedBackbone):
    """Plain ViT + simple feature pyramid; outputs {name: (B, out_channels, ceil(H/s), ceil(W/s))}."""

    @configurable
    def __init__(
        self,
        vit: VisionTransformer,
        out_features: List[str],
        out_channels: int,
        weights: str = "",
        strict: bool = False,
    ):
        super().__init__()
        self.vit = vit
        patch = vit.patch_embed.patch_size[0]
        if patch != 16:
            raise ValueError(f"D2ViT needs a patch-16 ViT (res4 = stride 16), got patch {patch}")
        dim = vit.embed_dim
        self._out_features = list(out_features)
        self._out_feature_strides = {k: int(patch * 2 ** _LEVELS[k]) for k in out_features}
        self._out_feature_channels = {k: out_channels for k in out_features}
        self.pyramid = nn.ModuleDict({k: pyramid_level(dim, _LEVELS[k]) for k in out_features})
        self.projections = nn.ModuleDict(
            {k: output_projection(level_channels(dim, _LEVELS[k]), out_channels) for k in out_features}
        )
        if weights:
            self.load_weights(weights, strict)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.VIT
        return {
            "vit": build_timm_vit(c.NAME, c.PRETRAINED, c.IMG_SIZE, vit_overrides(c)),
            "out_features": c.OUT_FEATURES,
            "out_channels": c.OUT_CHANNELS,
            "weights": c.WEIGHTS,
            "strict": cfg.MODEL.CHECKPOINT_STRICT,
        }

    def token_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of the patch -> (B, C, H / patch, W / patch)."""
        patch = self.vit.patch_embed.patch_size[0]
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        h, w = x.shape[-2] // patch, x.shape[-1] // patch
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def forward_padded(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        grid = self.token_map(x)
        return {k: self.projections[k](self.pyramid[k](grid)) for k in self._out_features}

    def load_weights(self, path: str, strict: bool = False):
        """Load a timm-layout or D2ViT-layout checkpoint (see module docstring); returns the report."""

        def resample(state):
            vit_keys = {k[len("vit."):]: v for k, v in state.items() if k.startswith("vit.")}
            fixed = checkpoint_filter_fn(vit_keys, self.vit)
            return {**{k: v for k, v in state.items() if not k.startswith("vit.")},
                    **{"vit." + k: v for k, v in fixed.items()}}

        return load_backbone_checkpoint(self, path, prefixes=("vit.",), filter_fn=resample, strict=strict)


def vit_overrides(c) -> Dict:
    """timm constructor overrides from cfg.MODEL.VIT (0 keeps the architecture's value)."""
    keys = {"embed_dim": c.EMBED_DIM, "depth": c.DEPTH, "num_heads": c.NUM_HEADS}
    out = {k: v for k, v in keys.items() if v}
    out["drop_path_rate"] = c.DROP_PATH_RATE
    return out
