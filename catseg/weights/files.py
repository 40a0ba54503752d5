"""The one reader of weight files: `.safetensors`, torch files (`.pth`, `.pt`, `.bin`) and
detectron2 / official `.pkl` files, each returned as a checkpoint dict {"model": {key: tensor
or array}, ...}.

- `.safetensors`: {"model": tensors}.
- `.pkl`: a detectron2 model-zoo file ({"model": ..., "__author__": ...}) as it is; any other
  mapping is a Caffe2 / Detectron file (its "blobs" if present, optimizer momenta dropped),
  marked `"__author__": "Caffe2"` with detectron2's name-matching heuristics on.
- torch files: the saved dict; a bare state_dict becomes {"model": state_dict}.
A missing or unreadable file (corrupt, truncated, another format) raises a one-line
`WeightsError` naming it.
"""
import os
import pickle
from typing import Any, Dict

import torch

from ..errors import WeightsError

# Containers a training script may wrap a state_dict in (unwrapped in this order by `state_dict_of`).
WRAPPERS = ("state_dict", "model", "module")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint dict of the weight file at `path` (see the module docstring)."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return {"model": load_file(path)}
        if path.endswith(".pkl"):
            return _pkl_checkpoint(path)
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the format's reader raises on a file that is no checkpoint
        raise WeightsError(f"weights file {path} is not a readable checkpoint: corrupt, truncated "
                           f"or another format ({type(e).__name__})") from None
    if not isinstance(loaded, dict):
        raise WeightsError(f"weights file {path} holds a {type(loaded).__name__}, not a checkpoint dict")
    return loaded if "model" in loaded else {"model": loaded}


def _pkl_checkpoint(path: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    if "model" in data and "__author__" in data:  # detectron2 model-zoo layout
        return data
    data = data.get("blobs", data)
    return {"model": {k: v for k, v in data.items() if not k.endswith("_momentum")},
            "__author__": "Caffe2", "matching_heuristics": True}


def state_dict_of(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint dict, unwrapped from `WRAPPERS` (numpy arrays as tensors)."""
    state: Any = checkpoint
    for wrapper in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k: torch.as_tensor(v) for k, v in state.items() if isinstance(v, torch.Tensor) or hasattr(v, "__array__")}
