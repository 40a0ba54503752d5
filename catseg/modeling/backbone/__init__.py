"""Guidance backbones registered in detectron2's BACKBONE_REGISTRY."""
from . import swin  # noqa: F401
from . import cluster, twins, vit  # noqa: F401
