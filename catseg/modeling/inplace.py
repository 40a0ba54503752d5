"""Arithmetic that writes into temporaries at inference.

With autograd off, residual sums and activations overwrite a tensor that nothing else reads,
which saves an allocation and a pass over memory each time (large fresh allocations are the
slow part on CPU). With autograd on, activations are the ordinary out-of-place operations and
a residual sum is written into its branch output, which autograd does not keep.
"""
from typing import Callable

import torch
from torch import nn

from .epilogue_linear import apply_linear, linear_activation


def residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y for a residual stream x and a branch output y: written into x when autograd is off
    (x must then be a temporary), into y when it is on (y must then be a temporary that no
    backward formula reads, such as a linear map's output)."""
    return y.add_(x) if torch.is_grad_enabled() else x.add_(y)


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """CLIP's QuickGELU, x * sigmoid(1.702 x), in place (the same operations)."""
    return x.mul_(torch.sigmoid_(x * 1.702))


def mlp(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor, activation: Callable, activation_: Callable) -> torch.Tensor:
    """fc2(activation(fc1(x))). Linear layers add their bias inside the product, and fc1 applies
    GELU / ReLU there too, where oneDNN can (`epilogue_linear`); otherwise the activation runs in
    place (`activation_`) when autograd is off. x: (..., C) -> (..., C_out)."""
    hidden = linear_activation(x, fc1, activation)
    if hidden is None:
        hidden = apply_linear(fc1, x)
        hidden = activation(hidden) if torch.is_grad_enabled() else activation_(hidden)
    return apply_linear(fc2, hidden)
