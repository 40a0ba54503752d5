"""Guidance backbones registered in detectron2's BACKBONE_REGISTRY."""
from . import cluster, twins, vit  # noqa: F401
