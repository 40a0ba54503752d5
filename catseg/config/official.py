"""Official CAT-Seg config files, unchanged: keys at their official place, and which release a file is.

The official code reads three keys from places where catseg keeps them elsewhere; official
files set them there. `apply_official_keys` copies each one, when set, to catseg's key (the
official place wins) and clears it, so that the rest of catseg reads one key only:

    official                   catseg
    MODEL.PROMPT_ENSEMBLE_TYPE MODEL.SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE
    MODEL.CLIP_PIXEL_MEAN      MODEL.SEM_SEG_HEAD.CLIP_PIXEL_MEAN
    MODEL.CLIP_PIXEL_STD       MODEL.SEM_SEG_HEAD.CLIP_PIXEL_STD

An official CVPR'24 file (`is_official_cvpr24`) describes a model whose differences from
v1 the official code hard-codes: the loader gives it MODEL.RELEASE "cvpr24" (the preset in
keys.py), and `map_official_cvpr24` reads its CLIP_FINETUNE in this release's meaning
(`CVPR24_FINETUNE`).

Official keys that change nothing (declared but never read by the official code) are accepted
in catseg/config/keys.py's "recipes" block. Official class-list paths ("datasets/coco.json") resolve
to the shipped lists (catseg/data/class_names.py).
"""
from typing import Optional

# official key (under MODEL) -> catseg key (under MODEL.SEM_SEG_HEAD)
MAPPED_KEYS = {"PROMPT_ENSEMBLE_TYPE": "PROMPT_ENSEMBLE_TYPE", "CLIP_PIXEL_MEAN": "CLIP_PIXEL_MEAN",
               "CLIP_PIXEL_STD": "CLIP_PIXEL_STD"}

# CLIP_FINETUNE of an official CVPR'24 file -> catseg's name of the same rule.
CVPR24_FINETUNE = {"attention": "qv", "full": "blocks"}


def map_official_cvpr24(cfg) -> None:
    """CLIP_FINETUNE of `cfg`, merged from an official CVPR'24 file, in catseg's names (in place)."""
    head = cfg.MODEL.SEM_SEG_HEAD
    head.CLIP_FINETUNE = CVPR24_FINETUNE.get(head.CLIP_FINETUNE, head.CLIP_FINETUNE)


def apply_official_keys(cfg) -> None:
    """Copy every set official-place key to catseg's key and clear it (in place; cfg not frozen)."""
    for official, ours in MAPPED_KEYS.items():
        value = cfg.MODEL[official]
        if len(value):
            cfg.MODEL.SEM_SEG_HEAD[ours] = type(cfg.MODEL.SEM_SEG_HEAD[ours])(value)
            cfg.MODEL[official] = type(value)()


def _lookup(data: dict, dotted: str) -> Optional[object]:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def is_official_cvpr24(loaded: dict) -> bool:
    """True for the YAML mapping (merged over its _BASE_ chain) of an official CAT-Seg CVPR'24
    config file: no file of the chain names a guidance backbone (MODEL.BACKBONE.NAME), and the
    effective MODEL.PROMPT_ENSEMBLE_TYPE (at the official place) is "single". v1 files name a
    backbone; catseg's own files set the template type under MODEL.SEM_SEG_HEAD."""
    return _lookup(loaded, "MODEL.BACKBONE.NAME") is None and _lookup(loaded, "MODEL.PROMPT_ENSEMBLE_TYPE") == "single"
