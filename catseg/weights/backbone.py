"""Load a local checkpoint into a guidance backbone, with a readable report of what did not fit.

A checkpoint may be in the backbone's own ("native") key layout — its ``state_dict()`` — or in
the layout of the library network it wraps (timm's keys, i.e. the native keys without the
wrapper's prefix such as ``vit.``), or be a whole-model checkpoint whose keys start with
``backbone.``. Keys are matched in that order; everything else is reported as unexpected.
Tensors whose shape differs from the model's are left out and reported, never loaded.
"""
import logging
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .files import read_checkpoint, state_dict_of
from .report import CheckpointMismatchError, LoadReport

logger = logging.getLogger(__name__)


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
        strict: raise ``CheckpointMismatchError`` when anything is missing, unexpected or mis-shaped.
    """
    own = model.state_dict()
    state = match_keys(state_dict_of(read_checkpoint(path)), list(own), prefixes)
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
        raise CheckpointMismatchError(f"checkpoint {path} does not fit {type(model).__name__}:\n{report}")
    return report
