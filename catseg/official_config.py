"""Official CAT-Seg config files, unchanged: keys at their official place, and which release a file is.

The official code reads three keys from places where catseg keeps them elsewhere; official
files set them there. `apply_official_keys` copies each one, when set, to catseg's key (the
official place wins) and clears it, so that the rest of catseg reads one key only:

    official                   catseg
    MODEL.PROMPT_ENSEMBLE_TYPE MODEL.SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE
    MODEL.CLIP_PIXEL_MEAN      MODEL.SEM_SEG_HEAD.CLIP_PIXEL_MEAN
    MODEL.CLIP_PIXEL_STD       MODEL.SEM_SEG_HEAD.CLIP_PIXEL_STD

An official CVPR'24 file (`is_official_cvpr24_file`) describes a model whose differences from
v1 the official code hard-codes; `apply_cvpr24_release` sets them as catseg keys
(`CVPR24_RELEASE`, and CLIP_FINETUNE in this release's meaning, `CVPR24_FINETUNE`).

Official keys that change nothing (declared but never read by the official code) are accepted
in catseg/config.py's "recipes" block. Official class-list paths ("datasets/coco.json") resolve
to the shipped lists (catseg/data/class_names.py).
"""
from pathlib import Path
from typing import Callable, List, Optional

import yaml

# official key (under MODEL) -> catseg key (under MODEL.SEM_SEG_HEAD)
MAPPED_KEYS = {"PROMPT_ENSEMBLE_TYPE": "PROMPT_ENSEMBLE_TYPE", "CLIP_PIXEL_MEAN": "CLIP_PIXEL_MEAN",
               "CLIP_PIXEL_STD": "CLIP_PIXEL_STD"}


# What the official CVPR'24 code hard-codes, as catseg keys under MODEL.SEM_SEG_HEAD.
CVPR24_RELEASE = {"GUIDANCE_SOURCE": "clip", "CLIP_DENSE_BLOCK": "cvpr24", "CLIP_ATTN_WEIGHTS": "split",
                  "TEXT_SYNONYMS": "first", "CLASS_PAD_LENGTH": 256}
# CLIP_FINETUNE of an official CVPR'24 file -> catseg's name of the same rule.
CVPR24_FINETUNE = {"attention": "qv", "full": "blocks"}


def apply_cvpr24_release(cfg) -> None:
    """Make `cfg`, loaded from an official CVPR'24 file, build the CVPR'24 model (in place)."""
    head = cfg.MODEL.SEM_SEG_HEAD
    for key, value in CVPR24_RELEASE.items():
        head[key] = value
    head.CLIP_FINETUNE = CVPR24_FINETUNE.get(head.CLIP_FINETUNE, head.CLIP_FINETUNE)


def apply_official_keys(cfg) -> None:
    """Copy every set official-place key to catseg's key and clear it (in place; cfg not frozen)."""
    for official, ours in MAPPED_KEYS.items():
        value = cfg.MODEL[official]
        if len(value):
            cfg.MODEL.SEM_SEG_HEAD[ours] = type(cfg.MODEL.SEM_SEG_HEAD[ours])(value)
            cfg.MODEL[official] = type(value)()


def beside(config_file: Path, base: str) -> Path:
    """A `_BASE_` entry resolved against its file's folder."""
    return config_file.parent / base


def base_chain(path: str, resolve: Callable[[Path, str], Path] = beside) -> List[dict]:
    """The YAML mappings of `path` and of its _BASE_ files, the file itself first; `resolve`
    finds a `_BASE_` entry (catseg's loader passes its own rule, `config.resolve_base`)."""
    chain, current = [], Path(path)
    while current is not None:
        with open(current) as f:
            data = yaml.safe_load(f) or {}
        chain.append(data)
        base = data.get("_BASE_")
        current = resolve(current, base) if base else None
    return chain


def _lookup(data: dict, dotted: str) -> Optional[object]:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def is_official_cvpr24_file(path: str, resolve: Callable[[Path, str], Path] = beside) -> bool:
    """True for an official CAT-Seg CVPR'24 config file: no file of its _BASE_ chain names a
    guidance backbone (MODEL.BACKBONE.NAME), and the effective MODEL.PROMPT_ENSEMBLE_TYPE (at
    the official place) is "single". v1 files name a backbone; catseg's own files set the
    template type under MODEL.SEM_SEG_HEAD."""
    chain = base_chain(path, resolve)
    if any(_lookup(data, "MODEL.BACKBONE.NAME") is not None for data in chain):
        return False
    templates = next((v for v in (_lookup(d, "MODEL.PROMPT_ENSEMBLE_TYPE") for d in chain) if v is not None), None)
    return templates == "single"
