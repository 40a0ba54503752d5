"""Guidance backbones registered in detectron2's BACKBONE_REGISTRY."""
from . import (  # noqa: F401
    cluster,
    swin,  # noqa: F401
    twins,
    vit,
)
