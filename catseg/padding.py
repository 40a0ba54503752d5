"""Bottom/right padding of images, label maps and feature maps to multiples of a stride."""
import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, divisor: int, value: float = 0) -> torch.Tensor:
    """(..., H, W) -> (..., H', W'): `value`-padded at the bottom / right, H' and W' the
    multiples of `divisor` at or above H and W (returned unchanged for divisor <= 0)."""
    if divisor <= 0:
        return x
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % divisor, 0, -h % divisor), value=value)
