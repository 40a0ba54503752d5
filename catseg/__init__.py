"""catseg: CAT-Seg open-vocabulary semantic segmentation on Detectron2.

Importing the package registers the meta-architecture, head, backbones, datasets and
evaluators with detectron2's registries.
"""
from . import data, modeling  # noqa: F401  (registration side effects)
from .config import add_catseg_config
from .predictor import OpenVocabPredictor

__all__ = ["add_catseg_config", "OpenVocabPredictor"]
