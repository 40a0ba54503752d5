"""Attention used by the class aggregation: linear (default) and full softmax attention.

Both take (N, L, heads, D) queries and (N, S, heads, D) keys / values and return (N, L, heads, D).
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Linear attention with the elu(x) + 1 feature map ("Transformers are RNNs").

    Values are divided by the sequence length before the products and multiplied back after
    (keeps fp16 in range; kept for exactness with released checkpoints).
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1]
    kv = torch.einsum("nshd,nshv->nhdv", k, v / length)
    z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * length


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, scale 1 / sqrt(D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


ATTENTION_FUNCTIONS = {"linear": linear_attention, "full": full_attention}


class AttentionLayer(nn.Module):
    """Multi-head attention whose queries and keys also see a guidance vector.

    q, k = Linear([x, guidance]); v = Linear(x).
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

    def forward(self, x: torch.Tensor, guidance: torch.Tensor = None) -> torch.Tensor:
        """x: (N, L, C); guidance: (N, L, G) or None. Returns (N, L, C)."""
        xg = torch.cat([x, guidance], dim=-1) if guidance is not None else x
        q, k, v = (rearrange(t, "n l (h d) -> n l h d", h=self.nheads) for t in (self.q(xg), self.k(xg), self.v(x)))
        return rearrange(self.attend(q, k, v), "n l h d -> n l (h d)")
