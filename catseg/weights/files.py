"""The one reader of weight files: `.safetensors`, torch files (`.pth`, `.pt`, `.bin`) and
detectron2 / official `.pkl` files, each returned as a checkpoint dict {"model": {key: tensor
or array}, ...}.

- `.safetensors`: {"model": tensors}.
- `.pkl`: read by a restricted unpickler (`SafeUnpickler`) that builds only containers, numbers,
  strings and numpy arrays; a detectron2 model-zoo file ({"model": ..., "__author__": ...}) as it is; any other
  mapping is a Caffe2 / Detectron file (its "blobs" if present, optimizer momenta dropped),
  marked `"__author__": "Caffe2"` with detectron2's name-matching heuristics on.
- torch files: loaded with `weights_only=True` (tensors, containers, numbers, strings only),
  memory-mapped when the file is in torch's zip format (tensors are read from the page cache
  on use, not copied up front); the saved dict; a bare state_dict becomes {"model": state_dict}.
A missing or unreadable file (corrupt, truncated, another format) raises a one-line
`WeightsError` naming it; so does a file that holds anything else than weights (a pickle that
would import or call code), which is refused before any of it runs.
"""
import os
import pickle
from typing import Any, Dict, Optional, Set, Tuple

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
        loaded = _torch_checkpoint(path)
    except WeightsError:
        raise
    except Exception as e:  # whatever the format's reader raises on a file that is no checkpoint
        reason = _refusal_reason(e) if isinstance(e, pickle.UnpicklingError) else None
        if reason:
            raise WeightsError(f"weights file {path} refused: it holds more than weights ({reason}); only "
                               "tensors, arrays, numbers and strings are loaded") from None
        raise WeightsError(f"weights file {path} is not a readable checkpoint: corrupt, truncated "
                           f"or another format ({type(e).__name__})") from None
    if not isinstance(loaded, dict):
        raise WeightsError(f"weights file {path} holds a {type(loaded).__name__}, not a checkpoint dict")
    return loaded if "model" in loaded else {"model": loaded}


# The only globals a weights .pkl may name: numpy arrays and scalars (numpy 1 and 2 module names;
# protocol 5 pickles arrays through _frombuffer), bytes written by Python 3 at protocol 2, ordered
# dicts. Nothing else is imported or called.
SAFE_PICKLE_GLOBALS: Set[Tuple[str, str]] = {
    (f"numpy.{core}.{module}", name) for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `SAFE_PICKLE_GLOBALS`: dicts, lists, tuples, numbers,
    strings and numpy arrays come out; any other global raises UnpicklingError before use."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")
        return super().find_class(module, name)


def _refusal_reason(error: Exception) -> Optional[str]:
    """The line of torch's weights-only error that names a refused global (what the file would
    import or call), or None when the file is merely unreadable."""
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line.rstrip(".") for line in lines if "GLOBAL" in line), None)


def _torch_checkpoint(path: str) -> Any:
    """torch.load with weights_only=True, memory-mapped for zip-format files (a legacy-format file,
    which cannot be mapped, is read whole)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _pkl_checkpoint(path: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        try:
            data = SafeUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise WeightsError(f"weights file {path} refused: {e} (only dicts, lists, tuples, numbers, "
                               "strings and numpy arrays are loaded from .pkl files)") from None
    if not isinstance(data, dict):
        raise WeightsError(f"weights file {path} holds a {type(data).__name__}, not a checkpoint dict")
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


def checkpoint_keys(path: str) -> Set[str]:
    """The state_dict keys of the weight file at `path`, reading as little as the format allows
    (safetensors: the header; zip-format torch files: the pickled structure, tensors mapped, not
    read). A missing or unreadable file raises WeightsError, as `read_checkpoint` does."""
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return set(f.keys())
        except Exception as e:  # a file that is no safetensors file
            raise WeightsError(f"weights file {path} is not a readable checkpoint ({type(e).__name__})") from None
    return set(state_dict_of(read_checkpoint(path)))
