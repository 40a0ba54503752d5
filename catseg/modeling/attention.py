"""Attention used by the class aggregation: linear (default) and full softmax attention.

The sequence runs along dim 1 (the T classes); every other leading dim is a batch dim, so a
(B, T, M, heads, D) layout attends across classes at each of the M positions without moving
the classes to a batch-major layout first. Both functions take queries / keys / values of
shape (B, L, M, heads, D) and return (B, L, M, heads, D).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Linear attention with the elu(x) + 1 feature map ("Transformers are RNNs").

    Values are divided by the sequence length before the products and multiplied back after
    (keeps fp16 in range; kept for exactness with released checkpoints).
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1]
    kv = torch.einsum("blmhd,blmhe->bmhde", k, v / length)
    z = 1 / (torch.einsum("blmhd,bmhd->blmh", q, k.sum(dim=1)) + eps)
    return torch.einsum("blmhd,bmhde->blmhe", q, kv) * (z * length).unsqueeze(-1)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, scale 1 / sqrt(D)."""
    move = lambda t: t.permute(0, 2, 3, 1, 4)  # noqa: E731  (B, M, heads, L, D)
    return F.scaled_dot_product_attention(move(q), move(k), move(v)).permute(0, 3, 1, 2, 4)


ATTENTION_FUNCTIONS = {"linear": linear_attention, "full": full_attention}


class AttentionLayer(nn.Module):
    """Multi-head attention whose queries and keys also see a guidance vector.

    q, k = Linear([x, guidance]); v = Linear(x). The guidance depends on the sequence element
    only (one vector per class), so its half of the q / k projections is computed once per
    element and broadcast over the positions, from the same parameters split at use time.
    """

    def __init__(self, hidden_dim: int, guidance_dim: int, nheads: int = 8, attention_type: str = "linear"):
        super().__init__()
        if attention_type not in ATTENTION_FUNCTIONS:
            raise ValueError(f"ATTENTION_TYPE {attention_type!r}: expected one of {sorted(ATTENTION_FUNCTIONS)}")
        self.nheads = nheads
        self.q = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.k = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.v = nn.Linear(hidden_dim, hidden_dim)
        self.attend = ATTENTION_FUNCTIONS[attention_type]

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, L, M, C), attention along L at each of the M positions; guidance: (B, L, G) or
        None. Returns (B, L, M, C)."""
        c = x.shape[-1]
        w_qk = torch.cat([self.q.weight[:, :c], self.k.weight[:, :c]])
        qk = F.linear(x, w_qk)
        bias = torch.cat([self.q.bias, self.k.bias])
        if guidance is not None:
            bias = F.linear(guidance, torch.cat([self.q.weight[:, c:], self.k.weight[:, c:]]), bias).unsqueeze(2)
        qk = qk.add_(bias)  # in place: the linear map's backward does not need its output
        heads = lambda t: t.unflatten(-1, (self.nheads, -1))  # noqa: E731
        q, k = heads(qk[..., :c]), heads(qk[..., c:])
        return self.attend(q, k, heads(self.v(x))).flatten(-2)
