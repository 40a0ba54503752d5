"""One source of truth for a run's classes: the registered datasets' class lists.

`resolve_class_lists(cfg)` runs before any model is built (train_net.py, the predictor):
- MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON "" means the class list of DATASETS.TRAIN,
  TEST_CLASS_JSON "" that of DATASETS.TEST; the key is set to that list's file;
- a class list the config names must equal the dataset's (same names, same order: label id i
  is class i); otherwise a one-line `ClassListError` names both lists;
- MODEL.SEM_SEG_HEAD.NUM_CLASSES is derived from the list (training's when training).
A dataset whose metadata has no `prompt_classes` (registered outside catseg) is not checked.
"""
from typing import List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog

from ..errors import ConfigError
from .class_names import load_class_names
from .datasets import DatasetError


class ClassListError(ConfigError):
    """The config's class list and a dataset's class list disagree."""


def _describe(spec: str, names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{spec} ({len(names)} classes: {shown})"


def dataset_class_list(name: str) -> Optional[Tuple[str, List[str]]]:
    """(class-list file or shipped name, class names) the dataset is prompted with, or None."""
    meta = MetadataCatalog.get(name)
    names = meta.get("prompt_classes")
    return None if names is None else (meta.get("class_list", name), list(names))


def _use_dataset_hint(key: str, lists) -> str:
    if not lists:
        return ""
    dataset, (source, names) = lists[0]
    return (f"; dataset {dataset}'s class list is {_describe(source, names)}: set {key} to \"\" to use it, "
            "or make the two lists the same")


def resolve_class_list(cfg, key: str, datasets: Sequence[str], check: bool = True) -> List[str]:
    """Fill MODEL.SEM_SEG_HEAD.`key` when "" and, with `check`, compare it with `datasets` (see
    the module docstring); returns the class names. `cfg` must not be frozen when the key is "".

    Errors (one line, naming the config's list and the dataset's): ClassListError when they
    differ, DatasetError when the config's list cannot be read, ConfigError when "" has no
    dataset to take a list from."""
    head = cfg.MODEL.SEM_SEG_HEAD
    spec = head.get(key)
    lists = [(d, found) for d in datasets if (found := dataset_class_list(d)) is not None]
    if not spec:
        if not lists:
            raise ConfigError(f"MODEL.SEM_SEG_HEAD.{key} is empty and no registered dataset gives a class list "
                              "(set the key to a class-list file or name a dataset)")
        spec = lists[0][1][0]
        head[key] = spec
    try:
        names = load_class_names(spec)
    except (ValueError, FileNotFoundError) as e:
        raise DatasetError(f"MODEL.SEM_SEG_HEAD.{key} {spec}: {' '.join(str(e).split())}"
                           f"{_use_dataset_hint(key, lists)}") from None
    for dataset, (source, dataset_names) in lists if check else []:
        if dataset_names != names:
            raise ClassListError(f"MODEL.SEM_SEG_HEAD.{key} {_describe(spec, names)} differs from the class "
                                 f"list of dataset {dataset}"
                                 f"{_use_dataset_hint(key, [(dataset, (source, dataset_names))])}")
    return names


def resolve_class_lists(cfg, train: bool = True, check: bool = True) -> None:
    """TEST_CLASS_JSON against DATASETS.TEST and, with `train`, TRAIN_CLASS_JSON against
    DATASETS.TRAIN (without `train`, an empty TRAIN_CLASS_JSON takes TEST_CLASS_JSON's list);
    NUM_CLASSES derived. In place, on an unfrozen cfg; the datasets must be registered
    (catseg.data.datasets.register_from_config). `check` False only fills empty keys."""
    head = cfg.MODEL.SEM_SEG_HEAD
    test = resolve_class_list(cfg, "TEST_CLASS_JSON", cfg.DATASETS.TEST, check)
    if train:
        names = resolve_class_list(cfg, "TRAIN_CLASS_JSON", cfg.DATASETS.TRAIN, check)
    else:
        names, head.TRAIN_CLASS_JSON = test, head.TRAIN_CLASS_JSON or head.TEST_CLASS_JSON
    head.NUM_CLASSES = len(names)
