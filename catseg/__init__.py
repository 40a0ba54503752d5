"""catseg: CAT-Seg open-vocabulary semantic segmentation on Detectron2.

Importing the package registers the meta-architecture, head, backbones, datasets and
evaluators with detectron2's registries, and silences the dependency warnings that do not
apply to catseg (catseg/console.py; before the imports that trigger them).
"""
from .console import silence_dependency_warnings

silence_dependency_warnings()

from . import data, modeling  # noqa: E402,F401  (registration side effects)
from .app.predictor import OpenVocabPredictor  # noqa: E402
from .config import add_catseg_config, load_config  # noqa: E402

__all__ = ["add_catseg_config", "load_config", "OpenVocabPredictor"]
