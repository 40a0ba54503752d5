"""Guidance sources: the appearance maps that guide cost aggregation, chosen by config.

A source returns three maps ordered by stride, deepest first: the appearance guidance at the
CLIP grid (h, w), then the two decoder guidances at (2h, 2w) and (4h, 4w). It declares its
channel counts (`channels`), so the aggregator is built from them, whether it reads the image
(`needs_image`), which CLIP blocks it reads (`clip_blocks`), and where its modules go in the
state_dict (`before_head`).

- "backbone" (CAT-Seg v1, `BackboneGuidance`): a detectron2 backbone's res4 / res3 / res2
  (strides 16 / 8 / 4) on the image resized to MODEL.BACKBONE_RESOLUTION.
- "clip" (CAT-Seg CVPR'24, `CLIPBlockGuidance`): CLIP's own features, no extra network: the
  final dense features, and the outputs of two intermediate vision blocks through learned
  transposed convolutions (x2 for the earlier block, x4 for the later one).

The modules of a source are registered on the meta-architecture under their official names
(`backbone.*`; `upsample1.*`, `upsample2.*`), see `CATSeg`.
"""
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.modeling import build_backbone
from torch import nn


class BackboneGuidance(nn.Module):
    """v1: a detectron2 backbone; its outputs sorted by stride, deepest first."""

    needs_image = True  # runs on the (backbone-normalised) image
    clip_blocks = ()  # no CLIP block outputs needed
    before_head = True  # v1 checkpoints list `backbone.*` before `sem_seg_head.*`

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        shapes = backbone.output_shape()
        self.names = sorted(shapes, key=lambda k: -shapes[k].stride)[:3]
        self.channels = [shapes[k].channels for k in self.names]

    def forward(self, clip_features: Dict[str, torch.Tensor], image: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """image: (B, 3, H, W) backbone input. Returns [(B, G0, h, w), (B, G1, 2h, 2w), (B, G2, 4h, 4w)]."""
        features = self.backbone(image)
        return [features[k] for k in self.names]


class CLIPBlockGuidance(nn.Module):
    """CVPR'24: the dense CLIP features, and two vision blocks' outputs upsampled x2 and x4.

    Args:
        width: CLIP vision width W (channels of the block outputs).
        embed_dim: CLIP embedding size C (channels of the dense features).
        blocks: the two 0-based vision blocks (earlier, later).
        decoder_dims: output channels of the x2 and x4 upsamplers.
    """

    needs_image = False
    before_head = False  # CVPR'24 checkpoints list `upsample1/2.*` after `sem_seg_head.*`

    def __init__(self, width: int, embed_dim: int, blocks: Sequence[int], decoder_dims: Sequence[int]):
        super().__init__()
        if len(blocks) != 2 or len(decoder_dims) != 2:
            raise ValueError(f"CLIP guidance needs two blocks and two decoder guidance dims, got {list(blocks)} "
                             f"and {list(decoder_dims)}")
        self.clip_blocks = list(blocks)
        self.upsample1 = nn.ConvTranspose2d(width, decoder_dims[0], kernel_size=2, stride=2)
        self.upsample2 = nn.ConvTranspose2d(width, decoder_dims[1], kernel_size=4, stride=4)
        self.channels = [embed_dim, *decoder_dims]

    def forward(self, clip_features: Dict[str, torch.Tensor],
                image: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """clip_features: DenseCLIPEncoder output with "dense" (B, C, h, w) and the two blocks
        (B, W, h, w). Returns [(B, C, h, w), (B, D0, 2h, 2w), (B, D1, 4h, 4w)]."""
        earlier, later = (clip_features[f"block{i}"] for i in self.clip_blocks)
        return [clip_features["dense"], self.upsample1(earlier), self.upsample2(later)]


def default_clip_guidance_blocks(clip_pretrained: str) -> List[int]:
    """Official guidance blocks: [3, 7] for "ViT-B/16", [7, 15] for every other CLIP."""
    return [3, 7] if clip_pretrained == "ViT-B/16" else [7, 15]


def build_guidance(cfg, clip_width: int, clip_embed_dim: int, clip_blocks: int) -> nn.Module:
    """The guidance source of MODEL.SEM_SEG_HEAD.GUIDANCE_SOURCE."""
    head = cfg.MODEL.SEM_SEG_HEAD
    if head.GUIDANCE_SOURCE == "backbone":
        backbone = build_backbone(cfg)
        if cfg.SOLVER.BACKBONE_MULTIPLIER == 0:
            backbone.requires_grad_(False)
        return BackboneGuidance(backbone)
    if head.GUIDANCE_SOURCE == "clip":
        blocks = list(head.CLIP_GUIDANCE_BLOCKS) or default_clip_guidance_blocks(head.CLIP_PRETRAINED)
        if not all(0 <= b < clip_blocks - 1 for b in blocks):
            raise ValueError(f"CLIP_GUIDANCE_BLOCKS {blocks}: the CLIP has {clip_blocks} vision blocks "
                             f"(valid: 0..{clip_blocks - 2}, the last one is the dense block)")
        return CLIPBlockGuidance(clip_width, clip_embed_dim, blocks, head.DECODER_GUIDANCE_DIMS)
    raise ValueError(f"GUIDANCE_SOURCE {head.GUIDANCE_SOURCE!r}: expected 'backbone' or 'clip'")
