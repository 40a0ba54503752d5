"""Backbone-only checkpoints (ImageNet weights) converted to the guidance backbone's key names.

Layouts recognised, per backbone:
- D2SwinTransformer: the official detectron2 `.pkl` (`swin_base_patch4_window12_384_22k.pkl`:
  the original Swin names, which are ours) and timm's Swin (`swin_base_patch4_window12_384.*`).
  timm keeps the patch merging at the START of stage i (`layers.{i}.downsample`, i >= 1), the
  original at the END of stage i - 1 (`layers.{i-1}.downsample`); the merge itself is the same
  (same sub-patch order, LayerNorm then a bias-free linear), so the keys just move.
- detectron2 ResNet: the official `R-101.pkl` (torchvision's weights under detectron2 names)
  and torchvision's ResNet (`conv1`/`bn1` -> `stem.conv1`/`stem.conv1.norm`, `layer{i}` ->
  `res{i+1}`, `bn{k}` -> `conv{k}.norm`, `downsample.{0,1}` -> `shortcut`/`shortcut.norm`).
- wrapped timm networks (D2ViT, D2Twins, D2ClusterBackbone): the library's own keys, matched
  under the wrapper's prefix (catseg/weights/backbone.py).
Keys of parts an ImageNet network has and the backbone does not build (the classifier, stages
after the last of OUT_FEATURES) are returned apart as surplus; any other key the backbone does
not have is unexpected and goes into the checkpointer's mismatch report.
"""
import re
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.modeling.backbone.resnet import ResNet
from torch import nn

from .backbone import match_keys

# Buffers the backbone computes from its own hyper-parameters: never expected in a checkpoint.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
# Prefix under which a wrapper keeps its library network (timm's key layout without it).
LIBRARY_PREFIXES = {"D2ViT": "vit.", "D2Twins": "twins.", "D2ClusterBackbone": "cluster."}


def is_swin(backbone: nn.Module) -> bool:
    """True for catseg's D2SwinTransformer (told by name: weights/ does not import the architectures)."""
    return type(backbone).__name__ == "D2SwinTransformer"


def is_backbone_only(state: Dict[str, object]) -> bool:
    """True when `state` holds no CAT-Seg head: an ImageNet backbone (possibly under `backbone.`)."""
    return not any(k.startswith("sem_seg_head.") for k in state)


def is_timm_swin(state: Dict[str, object]) -> bool:
    """timm's Swin: the first patch merging sits in stage 1, none in stage 0."""
    return "layers.1.downsample.reduction.weight" in state and "layers.0.downsample.reduction.weight" not in state


def swin_from_timm(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm Swin keys -> original Swin keys (patch merging moved to the end of the stage before)."""
    def rename(key: str) -> str:
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else key
    return {rename(k): v for k, v in state.items()}


def is_torchvision_resnet(state: Dict[str, object]) -> bool:
    return "conv1.weight" in state and "layer1.0.conv1.weight" in state


_TORCHVISION_RULES = [
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}."),
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
]


def resnet_from_torchvision(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision ResNet keys -> detectron2 ResNet keys (BatchNorm step counters dropped)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _TORCHVISION_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def layout_name(backbone: nn.Module, state: Dict[str, object]) -> str:
    """Human-readable name of the checkpoint layout, for the load report."""
    if is_swin(backbone):
        return "timm Swin" if is_timm_swin(state) else "detectron2 / original Swin"
    if isinstance(backbone, ResNet):
        return "torchvision ResNet" if is_torchvision_resnet(state) else "detectron2 ResNet"
    return f"{type(backbone).__name__} or its library's"


def to_backbone_keys(backbone: nn.Module, state: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """Checkpoint tensors renamed to `backbone`'s keys where the layout is known (others keep their name)."""
    state = {(k[len("backbone."):] if k.startswith("backbone.") else k):
             (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    if is_swin(backbone) and is_timm_swin(state):
        return swin_from_timm(state)
    if isinstance(backbone, ResNet) and is_torchvision_resnet(state):
        return resnet_from_torchvision(state)
    prefix = LIBRARY_PREFIXES.get(type(backbone).__name__)
    return match_keys(state, list(backbone.state_dict()), (prefix,) if prefix else ())


def is_surplus(backbone: nn.Module, key: str) -> bool:
    """True for a checkpoint key of a part an ImageNet network has and this backbone does not
    build: the classifier (and Swin's final norm), stages after the last output."""
    if is_swin(backbone):
        built = len(backbone.layers)
        m = re.match(r"layers\.(\d+)\.", key)
        return (key.startswith(("head.", "norm.")) or (m is not None and int(m.group(1)) >= built)
                or key.startswith(f"layers.{built - 1}.downsample."))
    if isinstance(backbone, ResNet):
        m = re.match(r"(res\d)\.", key)
        return key.startswith("fc.") or (m is not None and m.group(1) not in backbone.stage_names)
    return False


def convert_backbone_state(backbone: nn.Module, state: Dict[str, object]
                           ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """(tensors under `backbone`'s own keys, surplus checkpoint keys (see `is_surplus`), other
    checkpoint keys the backbone does not have), keys after renaming.

    Derived buffers (relative position indices, attention masks) are dropped: the backbone
    computes its own."""
    renamed = {k: v for k, v in to_backbone_keys(backbone, state).items() if not k.endswith(DERIVED_BUFFERS)}
    own = backbone.state_dict()
    other = sorted(k for k in renamed if k not in own)
    surplus = [k for k in other if is_surplus(backbone, k)]
    return ({k: v for k, v in renamed.items() if k in own}, surplus,
            [k for k in other if k not in set(surplus)])


def wrapper_keys(backbone: nn.Module) -> List[str]:
    """Backbone keys no ImageNet checkpoint has: D2SwinTransformer's output norms `norm{i}`
    (detectron2 adds them; they start as the identity affine map, weight 1 and bias 0)."""
    if not is_swin(backbone):
        return []
    return [k for k in backbone.state_dict() if re.match(r"norm\d+\.", k)]


def expected_keys(backbone: nn.Module) -> List[str]:
    """Backbone keys an ImageNet checkpoint should provide: the state_dict without derived
    buffers and wrapper keys."""
    skip = set(wrapper_keys(backbone))
    return [k for k in backbone.state_dict() if not k.endswith(DERIVED_BUFFERS) and k not in skip]
