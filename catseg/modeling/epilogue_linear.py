"""Linear maps whose bias is added inside the matrix product: inference on the CPU.

F.linear on the CPU (aten::addmm) first copies the broadcast bias into the whole output, then
runs the GEMM with beta = 1, which reads that output back: two extra passes over a tensor that
is often the largest of the layer (an MLP's hidden layer is 4x its input). oneDNN's matmul adds
the bias in its epilogue, while each output tile is still in registers. In the CVPR'24 B
aggregator at K = 847 that takes the bias copies from 1.8 s of op time to none, the products
themselves unchanged (benchmarks/RESULTS.md, 2026-12-06).

The same epilogue applies an MLP's activation (exact GELU, ReLU) to each tile before it is
written (`linear_activation`), which saves the activation's own pass over the hidden layer.

`linear` and `linear_activation` take that path where it is available and the result is the
same up to rounding (float32 CPU tensors, contiguous, no autograd, no autocast, oneDNN built in);
elsewhere they are F.linear and the activation, the plain path (tests/test_epilogue_linear.py
compares the two).
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def epilogue_bias_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether `linear` runs oneDNN's matmul with the bias in its epilogue for these operands."""
    return (bias is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == weight.dtype == bias.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and x.is_contiguous() and weight.is_contiguous() and torch.backends.mkldnn.is_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias): (..., C_in) x (C_out, C_in) + (C_out,) -> (..., C_out)."""
    if epilogue_bias_applies(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def is_plain_linear(layer: nn.Module) -> bool:
    """An nn.Linear whose forward is nn.Linear's own (a subclass may compute something else)."""
    return isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward


# activations oneDNN applies in the epilogue: its post-op name and algorithm argument
EPILOGUE_ACTIVATIONS = {F.gelu: ("gelu", "none"), F.relu: ("relu", "")}


def linear_activation(x: torch.Tensor, layer: nn.Module, activation: Callable) -> Optional[torch.Tensor]:
    """activation(layer(x)) with the bias and the activation in oneDNN's epilogue, or None where
    that path does not apply (the caller then runs the plain layer and activation).
    x: (..., C_in) -> (..., C_out). `activation`: F.gelu (exact, not tanh) or F.relu."""
    if activation not in EPILOGUE_ACTIVATIONS or not is_plain_linear(layer):
        return None
    if not epilogue_bias_applies(x, layer.weight, layer.bias):
        return None
    name, algorithm = EPILOGUE_ACTIVATIONS[activation]
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, name, [], algorithm)


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x); a plain nn.Linear (forward not overridden) through `linear`."""
    if is_plain_linear(layer):
        return linear(x, layer.weight, layer.bias)
    return layer(x)
