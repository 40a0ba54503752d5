"""Building a model straight from its checkpoint: no random initialisation of the tensors the
checkpoint replaces, no second copy of them.

The ordinary way builds the model (every tensor allocated and randomly initialised), then reads
the checkpoint and copies it in: two copies of the weights in memory and seconds of random
numbers thrown away. `build_from_checkpoint` instead
1. reads the checkpoint first (memory-mapped for zip-format .pth files, catseg/weights/files.py);
2. builds the model with every large tensor (>= `META_MIN_NUMEL` elements) created on the meta
   device (shape only: no memory, no initialisation); small ones (buffers computed from the
   config, norms, biases) are created as usual;
3. puts the checkpoint's tensors in place of the meta ones (the model's parameters then are the
   checkpoint's tensors: mapped file pages, read on first use);
4. loads the checkpoint through CATSegCheckpointer as usual (its one mismatch report; the tensors
   of step 3 are copied onto themselves, which copies nothing).
When the checkpoint lacks a large tensor (or has it with another shape), the model is built the
ordinary way instead, so the result is always the ordinary one.
"""
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from ..errors import WeightsError
from ..weights.checkpointer import CATSegCheckpointer
from ..weights.files import read_checkpoint

logger = logging.getLogger(__name__)

META_MIN_NUMEL = 1 << 16  # tensors with at least this many elements are created on the meta device


def _requested_numel(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> int:
    """Elements a factory call (torch.empty(2, 3), torch.zeros((2, 3)), torch.full((2, 3), x), ...)
    asks for; 0 when its size is not given as ints (torch.tensor(data), torch.arange(...), ...)."""
    size = kwargs.get("size", args[0] if args else None)
    if isinstance(size, int) and not isinstance(size, bool):
        size = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    if not isinstance(size, (tuple, list, torch.Size)) or not all(isinstance(s, int) for s in size):
        return 0
    numel = 1
    for s in size:
        numel *= s
    return numel


class LargeTensorsOnMeta(TorchFunctionMode):
    """Factory calls without a device that ask for at least `min_numel` elements create their
    tensor on the meta device; everything else runs unchanged."""

    def __init__(self, min_numel: int = META_MIN_NUMEL):
        super().__init__()
        self.min_numel = min_numel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is None and func in _device_constructors() \
                and _requested_numel(args, kwargs) >= self.min_numel:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def fill_from_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[str]:
    """Replace every meta tensor of `model` by the tensor of the same name in `state` (in place),
    and make `state` hold the model's tensor objects for them. Returns the name of the first meta
    tensor `state` cannot give (missing, other shape, not floating point), after which the model
    is unusable; None when all were replaced."""
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, kind).items():
                if tensor is None or not tensor.is_meta:
                    continue
                key = f"{module_name}.{name}" if module_name else name
                value = state.get(key)
                if not isinstance(value, torch.Tensor) or value.shape != tensor.shape \
                        or not value.is_floating_point():
                    return key
                value = value.to(tensor.dtype)
                if kind == "_parameters":
                    value = nn.Parameter(value, requires_grad=tensor.requires_grad)
                getattr(module, kind)[name] = value
                state[key] = value
    return None


def build_from_checkpoint(cfg, weights: Optional[str] = None) -> nn.Module:
    """The model of `cfg` with the local checkpoint `weights` (default MODEL.WEIGHTS) loaded, built
    as the module docstring says; on MODEL.DEVICE."""
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    if not weights:
        return build_model(cfg)
    if "://" not in weights and not os.path.isfile(weights):
        raise WeightsError(f"weights file {weights} not found (MODEL.WEIGHTS)")
    if "://" in weights:  # a detectron2 catalog / URL name: the checkpointer's own reading
        model = build_model(cfg)
        CATSegCheckpointer(model, strict=cfg.MODEL.CHECKPOINT_STRICT).load(weights)
        return model
    checkpoint = read_checkpoint(weights)
    state = checkpoint.get("model")
    model = None
    if isinstance(state, dict) and checkpoint.get("__author__") != "Caffe2":
        with LargeTensorsOnMeta():  # detectron2's build_model without its final .to(device)
            candidate = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
        unfilled = fill_from_state(candidate, state)
        if unfilled is None:
            model = candidate.to(cfg.MODEL.DEVICE)
        else:
            logger.info("%s has no tensor %s: building the model with random initialisation first", weights, unfilled)
    if model is None:
        model = build_model(cfg)
    CATSegCheckpointer(model, strict=cfg.MODEL.CHECKPOINT_STRICT, preloaded=checkpoint).load(weights)
    return model
