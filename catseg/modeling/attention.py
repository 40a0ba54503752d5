"""Attention used by the class aggregation: linear (default) and full softmax attention; and
the per-window masked attention of the shifted-window blocks (aggregator and Swin backbone).

The sequence runs along dim -2 (the T classes) and every leading dim is a batch dim, so a
(B, M, T, C) chunk attends across classes at each of its M positions. The attention functions
take queries / keys / values of shape (..., L, C) with C = heads * D and return (..., L, C).
`linear_attention` and `full_attention` are the fast forms; `linear_attention_plain` and
`full_attention_plain` compute the same in the official order (per head, explicit products).

Class padding (CVPR'24): the sequence is extended by `count` copies of one extra token (key
`k_extra`, value `v_extra`, shape (C,)). Every copy is the same, so in linear attention their
contribution to the key / value sums is one rank-1 term, and their own outputs are not needed.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .epilogue_linear import apply_linear


class ExtraTokens(NamedTuple):
    """`count` copies of one token appended to every sequence: its key and value, (C,) each."""

    count: int
    k: torch.Tensor
    v: torch.Tensor


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float = 1e-6,
                     extra: Optional[ExtraTokens] = None, inplace: bool = False) -> torch.Tensor:
    """Linear attention with the elu(x) + 1 feature map ("Transformers are RNNs"), per head.

    Values are divided by the sequence length before the products and multiplied back after
    (keeps fp16 in range; kept for exactness with released checkpoints). The per-head (D, D)
    key-value summaries are the diagonal blocks of one (C, C) product, so every product is a
    plain batched matrix product over the leading dims, without moving the heads. `extra`
    tokens enter the sums and the length as a rank-1 term; only the L real outputs are returned.
    `inplace` (autograd off, q / k / v temporaries of the caller): the feature maps and the
    division overwrite q, k and v instead of allocating (the same operations, the same values).
    """
    length, c = v.shape[-2:]
    length += extra.count if extra is not None else 0
    if inplace:
        q, k, v = F.elu(q, inplace=True).add_(1), F.elu(k, inplace=True).add_(1), v.div_(length)
    else:
        q, k, v = F.elu(q) + 1, F.elu(k) + 1, v / length
    same_head = torch.block_diag(*[q.new_ones(c // heads, c // heads)] * heads)  # (C, C)
    kv = torch.matmul(k.transpose(-1, -2), v)  # (..., C, C)
    k_sum = k.sum(dim=-2, keepdim=True)  # (..., 1, C)
    if extra is not None:
        k_extra = F.elu(extra.k) + 1
        kv = kv + extra.count * torch.outer(k_extra, extra.v / length)
        k_sum = k_sum + extra.count * k_extra
    kv = kv.mul_(same_head)
    z = (q * k_sum).unflatten(-1, (heads, -1)).sum(-1).add_(eps).reciprocal_()  # (..., L, heads)
    out = torch.matmul(q, kv).unflatten(-1, (heads, -1))
    return out.mul_((z * length).unsqueeze(-1)).flatten(-2)


def linear_attention_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           eps: float = 1e-6) -> torch.Tensor:
    """`linear_attention` in the official order: heads split, per-head einsum products."""
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))  # (..., L, heads, D)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    length = v.shape[-3]
    kv = torch.einsum("...shd,...shm->...hmd", k, v / length)
    z = 1 / (torch.einsum("...lhd,...hd->...lh", q, k.sum(dim=-3)) + eps)
    return (torch.einsum("...lhd,...hmd,...lh->...lhm", q, kv, z) * length).flatten(-2)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention per head, scale 1 / sqrt(D), through the fused kernel."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(-3, -2)  # noqa: E731  (..., heads, L, D)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(-3, -2).flatten(-2)


def full_attention_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """`full_attention` as explicit softmax(q k^T / sqrt(D)) v per head."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(-3, -2) for t in (q, k, v))  # (..., heads, L, D)
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return (weights @ v).transpose(-3, -2).flatten(-2)


def per_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                         scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Window attention where every window position has its own additive mask, shared by the batch.

    q, k, v: (B, nW, heads, N, d); masks: (nW, heads or 1, N, N). Returns (B, nW, heads, N, d).
    One fused call per window position: a 4-D mask broadcast over the batch keeps PyTorch's fused
    CPU kernel, where a single 5-D call would fall back to the unfused path.
    """
    # unbind, not indexing: its backward stacks the window gradients instead of summing zero-filled copies
    return torch.stack([F.scaled_dot_product_attention(qi, ki, vi, mask.unsqueeze(0).to(q.dtype),
                                                       dropout_p=dropout_p, scale=scale)
                        for qi, ki, vi, mask in zip(q.unbind(1), k.unbind(1), v.unbind(1), masks)], dim=1)


ATTENTION_FUNCTIONS = {"linear": linear_attention, "full": full_attention}
PLAIN_ATTENTION_FUNCTIONS = {"linear": linear_attention_plain, "full": full_attention_plain}


class AttentionLayer(nn.Module):
    """Multi-head attention whose queries and keys also see a guidance vector.

    q, k = Linear([x, guidance]); v = Linear(x). `forward` dispatches on `fused`; `prepare(guidance)`
    gives the path's `context`. Fused path (`forward_fused`): the guidance depends on the sequence
    element only (one vector per class), so its half of the q / k projections is computed once per
    element (`qk_bias`, the fused context) and broadcast over the positions, from the same
    parameters split at use time; `extra` tokens enter linear
    attention as one rank-1 term. Plain path (`forward_plain`): the concatenation, as written,
    and `extra` tokens appended to the sequence (their own outputs dropped).
    """

    def __init__(self, hidden_dim: int, guidance_dim: int, nheads: int = 8, attention_type: str = "linear"):
        super().__init__()
        if attention_type not in ATTENTION_FUNCTIONS:
            raise ValueError(f"ATTENTION_TYPE {attention_type!r}: expected one of {sorted(ATTENTION_FUNCTIONS)}")
        self.nheads = nheads
        self.attention_type = attention_type
        self.q = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.k = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.v = nn.Linear(hidden_dim, hidden_dim)
        self.fused = True

    def qk_bias(self, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """(..., L, G) guidance or None -> (..., L, 2C) (or (2C,)): bias plus guidance half of [q, k]."""
        c = self.v.in_features
        bias = torch.cat([self.q.bias, self.k.bias])
        if guidance is None:
            return bias
        return F.linear(guidance, torch.cat([self.q.weight[:, c:], self.k.weight[:, c:]]), bias)

    def extra_tokens(self, count: int, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> ExtraTokens:
        """`count` copies of the normalised token x (C,) with guidance (G,) or None: their key and value."""
        xg = x if guidance is None else torch.cat([x, guidance])
        return ExtraTokens(count, self.k(xg), self.v(x))

    def prepare(self, guidance: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(..., L, G) guidance, broadcastable to x's leading dimensions, or None -> the `forward`
        context: fused, `qk_bias(guidance)` (computed once, reused by every chunk of positions);
        plain, the guidance."""
        return self.qk_bias(guidance) if self.fused else guidance

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor],
                extra: Optional[ExtraTokens] = None) -> torch.Tensor:
        """x: (..., L, C), attention along L; context: `prepare` output; extra: tokens appended to
        every sequence (the fused path takes them with linear attention only). Returns (..., L, C)."""
        if self.fused:
            return self.forward_fused(x, context, extra)
        return self.forward_plain(x, context, extra)

    def forward_fused(self, x: torch.Tensor, context: Optional[torch.Tensor],
                      extra: Optional[ExtraTokens] = None) -> torch.Tensor:
        """context: `qk_bias` output, broadcastable to (..., L, 2C)."""
        c = x.shape[-1]
        qk = F.linear(x, torch.cat([self.q.weight[:, :c], self.k.weight[:, :c]]))
        qk = qk.add_(context)  # in place: the linear map's backward does not need its output
        v = apply_linear(self.v, x)
        if self.attention_type == "linear":  # q, k, v are temporaries: feature maps in place without autograd
            return linear_attention(qk[..., :c], qk[..., c:], v, self.nheads, extra=extra,
                                    inplace=not torch.is_grad_enabled())
        if extra is not None:
            raise ValueError("extra tokens need linear attention")
        return ATTENTION_FUNCTIONS[self.attention_type](qk[..., :c], qk[..., c:], v, self.nheads)

    def forward_plain(self, x: torch.Tensor, context: Optional[torch.Tensor],
                      extra: Optional[ExtraTokens] = None) -> torch.Tensor:
        """context: the guidance, (..., L, G) broadcastable to x's leading dimensions, or None."""
        guidance = context
        xg = x if guidance is None else torch.cat([x, guidance.expand(*x.shape[:-1], -1)], dim=-1)
        q, k, v = self.q(xg), self.k(xg), self.v(x)
        length = x.shape[-2]
        if extra is not None:  # appended tokens: zero queries (outputs dropped), their keys and values
            def append(t: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
                return torch.cat([t, token.expand(*t.shape[:-2], extra.count, -1)], dim=-2)
            q, k, v = append(q, torch.zeros_like(extra.k)), append(k, extra.k), append(v, extra.v)
        return PLAIN_ATTENTION_FUNCTIONS[self.attention_type](q, k, v, self.nheads)[..., :length, :]
