"""Linear maps whose bias is added inside the matrix product: inference on the CPU.

F.linear on the CPU (aten::addmm) first copies the broadcast bias into the whole output, then
runs the GEMM with beta = 1, which reads that output back: two extra passes over a tensor that
is often the largest of the layer (an MLP's hidden layer is 4x its input). oneDNN's matmul adds
the bias in its epilogue, while each output tile is still in registers. In the CVPR'24 B
aggregator at K = 847 that takes the bias copies from 1.8 s of op time to none, the products
themselves unchanged (benchmarks/RESULTS.md, 2026-12-06).

`linear` takes that path where it is available and the result is the same up to rounding
(float32 CPU tensors, contiguous, no autograd, no autocast, oneDNN built in) and is F.linear,
the plain path, everywhere else (tests/test_epilogue_linear.py compares the two).
"""
from typing import Optional

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


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x); a plain nn.Linear (forward not overridden) through `linear`."""
    if isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
        return linear(x, layer.weight, layer.bias)
    return layer(x)
