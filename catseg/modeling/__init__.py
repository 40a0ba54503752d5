"""CAT-Seg model: meta-architecture, head, aggregator, CLIP wrapper and backbones."""
from . import backbone  # noqa: F401  (registers backbones)
from .head import CATSegHead
from .meta_arch import CATSeg

__all__ = ["CATSeg", "CATSegHead"]
