"""Loading a catseg config: YAML files with their `_BASE_` chain, key checks with "did you
mean", official files recognised and mapped, the device default, and the shipped configs."""
import difflib
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Union

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from ..errors import ConfigError
from .keys import RELEASES, add_catseg_config, apply_release
from .official import apply_official_keys, is_official_cvpr24, map_official_cvpr24

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the shipped configs (in the package)
BASE_KEY = "_BASE_"


def shipped_config(name: str) -> Path:
    """Path of a config shipped with catseg, by its path under configs/ ("tiny.yaml",
    "cvpr24/vitb_384.yaml"); the same folder in a source checkout and an installed wheel."""
    path = CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"no shipped config {name} (the shipped configs are in {CONFIG_DIR})")
    return path


def load_config(config: Union[str, CN], opts: Sequence[str] = ()) -> CN:
    """A catseg config from a YAML path (or a copy of a CfgNode), with KEY VALUE overrides.

    Raises ConfigError (one line) for a missing or invalid file, an unknown key (with the
    closest existing keys), a value of the wrong type or an odd override list. A relative
    `_BASE_` is looked up beside the file, then among the shipped configs (so a copied config
    works from any folder). MODEL.DEVICE "cuda" without CUDA becomes "cpu" (see `resolve_device`).

    MODEL.RELEASE (from the overrides, else the file, else "cvpr24" for an official CVPR'24 file,
    else "v1") presets its release's keys before the file and the overrides are merged, so each
    of them can still be set explicitly.
    """
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"config overrides take KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    if isinstance(config, CN):
        cfg = config.clone()
        cfg.defrost()
        if "MODEL.RELEASE" in opts[0::2]:
            apply_release(cfg, _release_of({}, opts))
    else:
        cfg = get_cfg()
        add_catseg_config(cfg)
        loaded = read_config_file(config)
        check_keys(cfg, flatten_keys(loaded), f"config file {config}")
        apply_release(cfg, _release_of(loaded, opts))
        _merge(lambda: cfg.merge_from_other_cfg(type(cfg)(loaded)), f"config file {config}")
        if is_official_cvpr24(loaded):
            map_official_cvpr24(cfg)
    check_keys(cfg, opts[0::2], "override")
    _merge(lambda: cfg.merge_from_list(opts), "override")
    apply_official_keys(cfg)
    resolve_device(cfg)
    return cfg


def _release_of(loaded: Dict[str, Any], opts: Sequence[str]) -> str:
    """The MODEL.RELEASE a config asks for: the last override, the file's value, "cvpr24" for an
    official CVPR'24 file, else "v1". ConfigError for an unknown release."""
    given = [value for key, value in zip(opts[0::2], opts[1::2]) if key == "MODEL.RELEASE"]
    release = given[-1] if given else (loaded.get("MODEL") or {}).get("RELEASE")
    if release is None:
        release = "cvpr24" if is_official_cvpr24(loaded) else "v1"
    if release not in RELEASES:
        raise ConfigError(f"MODEL.RELEASE {release!r}: expected one of {', '.join(RELEASES)}")
    return release


def _merge(merge, source: str) -> None:
    """Run a yacs merge, turning its errors (wrong value types, ...) into one ConfigError line."""
    try:
        merge()
    except (KeyError, ValueError, AssertionError, SyntaxError) as e:
        raise ConfigError(f"{source}: {e.args[0] if e.args else type(e).__name__}") from None


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """The YAML mapping of `path`, merged over its `_BASE_` chain (see `resolve_base`)."""
    if not str(path):
        raise ConfigError("no config file given: pass --config-file, e.g. configs/quickstart.yaml "
                          f"(the shipped configs are in {CONFIG_DIR})")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} is not a YAML mapping of config keys")
    bases = loaded.pop(BASE_KEY, [])
    merged: Dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _merge_dicts(read_config_file(resolve_base(path, base)), merged)
    _merge_dicts(loaded, merged)
    return merged


def is_official_cvpr24_file(path: Union[str, Path]) -> bool:
    """`is_official_cvpr24` of a config file, read as `load_config` reads it."""
    return is_official_cvpr24(read_config_file(path))


def resolve_base(config_file: Path, base: str) -> Path:
    """Path of `config_file`'s `_BASE_` entry `base`: absolute as given; a relative one beside
    the file, else the shipped config of that path or file name (configs/)."""
    base_path = Path(base).expanduser()
    if base_path.is_absolute():
        candidates = [base_path]
    else:
        candidates = [config_file.parent / base_path, CONFIG_DIR / base_path, CONFIG_DIR / base_path.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {config_file}: _BASE_ {base} not found (looked in "
                      f"{', '.join(str(c) for c in dict.fromkeys(candidates))})")


def _merge_dicts(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    """Merge mapping `a` into `b` in place (values of `a` win; nested mappings merge)."""
    for key, value in a.items():
        if isinstance(value, dict) and isinstance(b.get(key), dict):
            _merge_dicts(value, b[key])
        else:
            b[key] = value


def flatten_keys(mapping: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys of the leaves of a nested mapping: {"A": {"B": 1}} -> ["A.B"]."""
    keys = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            keys += flatten_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _accepts(cfg: CN, key: str) -> bool:
    """True when `key` exists in `cfg` or falls under a node that allows new keys."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CN):
            return False
        if part not in node:
            return node.is_new_allowed()
        node = node[part]
    return True


def check_keys(cfg: CN, keys: Iterable[str], source: str) -> None:
    """ConfigError for the first key `cfg` does not have, naming the closest existing keys."""
    for key in keys:
        if not _accepts(cfg, key):
            close = difflib.get_close_matches(key, flatten_keys(cfg), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"{source}: unknown config key {key}{hint}")


def resolve_device(cfg: CN) -> None:
    """MODEL.DEVICE "cuda..." without CUDA -> "cpu" (in place); logs one line naming the device."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        was_frozen, model = cfg.is_frozen(), cfg.MODEL
        cfg.defrost()
        model.DEVICE = "cpu"
        if was_frozen:
            cfg.freeze()
        logger.info("device: cpu (CUDA is not available)")
    else:
        logger.info(f"device: {cfg.MODEL.DEVICE}")
