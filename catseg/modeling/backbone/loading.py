"""Load a local checkpoint into a guidance backbone, with a readable report of what did not fit.

A checkpoint may be in the backbone's own ("native") key layout — its ``state_dict()`` — or in
the layout of the library network it wraps (timm's keys, i.e. the native keys without the
wrapper's prefix such as ``vit.``), or be a whole-model checkpoint whose keys start with
``backbone.``. Keys are matched in that order; everything else is reported as unexpected.
Tensors whose shape differs from the model's are left out and reported, never loaded.
"""
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Containers a training script may wrap the weights in (checked in this order).
_WRAPPERS = ("state_dict", "model", "module")


@dataclass
class LoadReport:
    """What happened when a checkpoint was loaded: key lists, one per outcome."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "shape_mismatch"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}): " + ", ".join(sorted(keys)))
        return "\n".join(lines)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors`` file, unwrapped."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def match_keys(
    state: Dict[str, torch.Tensor], model_keys: Sequence[str], prefixes: Sequence[str] = ()
) -> Dict[str, torch.Tensor]:
    """Rename checkpoint keys to model keys: as is, with one of ``prefixes`` added, or with a
    leading ``backbone.`` removed. Keys that match nothing keep their name (-> unexpected)."""
    known = set(model_keys)
    out = {}
    for key, value in state.items():
        stripped = key[len("backbone."):] if key.startswith("backbone.") else key
        candidates = [key, stripped] + [p + stripped for p in prefixes]
        out[next((c for c in candidates if c in known), key)] = value
    return out


def load_backbone_checkpoint(
    model: nn.Module,
    path: str,
    prefixes: Sequence[str] = (),
    filter_fn: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
    strict: bool = False,
) -> LoadReport:
    """Load the checkpoint at ``path`` into ``model`` and log a report.

    Args:
        prefixes: module prefixes under which the wrapped library network lives (e.g. ``"vit."``),
            tried for keys that are not native.
        filter_fn: converts library-layout tensors to the model's (e.g. timm's position-embedding
            resampling), applied to the renamed state dict.
        strict: raise ``RuntimeError`` when anything is missing, unexpected or mis-shaped.
    """
    own = model.state_dict()
    state = match_keys(read_state_dict(path), list(own), prefixes)
    if filter_fn is not None:
        state = filter_fn(state)
    report = LoadReport()
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.shape_mismatch.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = value
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(set(own) - set(usable))
    logger.info("%s <- %s\n%s", type(model).__name__, path, report)
    if strict and (report.missing or report.unexpected or report.shape_mismatch):
        raise RuntimeError(f"checkpoint {path} does not fit {type(model).__name__}:\n{report}")
    return report
