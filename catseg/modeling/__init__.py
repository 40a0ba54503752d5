"""CAT-Seg model: meta-architecture, head, aggregator, CLIP wrapper and backbones."""
from . import backbone  # noqa: F401  (registers backbones)
