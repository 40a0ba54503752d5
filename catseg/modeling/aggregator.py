"""Cost aggregation: cost volume, spatial + class aggregation layers, guided upsampling decoder.

Notation: B images, T classes, P prompt templates, C channels, H x W the CLIP token grid.
Module names follow the official implementation, so released checkpoints load unchanged.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import Mlp
from torch import nn

from .attention import AttentionLayer


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, window * window, C) -> (B, H, W, C); inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(resolution: Tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """Additive attention mask of the shifted windows: (nW, window^2, window^2), 0 or -100.

    Tokens that the cyclic shift brought together from different image regions may not attend
    to each other.
    """
    h, w = resolution
    region = torch.zeros(1, h, w, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in bounds for ws in bounds):
        region[:, hs, ws, :] = i
    ids = window_partition(region, window).squeeze(-1)  # (nW, window^2)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Window self-attention whose queries and keys see the appearance guidance.

    q, k = Linear([x, guidance]); v = Linear(x); no relative position bias.
    """

    def __init__(self, dim: int, guidance_dim: int, num_heads: int):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B * nW, N, C + G) windows of [features, guidance]; mask: (nW, N, N). Returns (B * nW, N, C)."""
        n_win, n, _ = x.shape
        split = lambda t: t.reshape(n_win, n, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x[..., : self.dim]))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(n_win, n, -1)
        return self.proj(out)


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention block over one cost slice, guided by appearance."""

    def __init__(self, dim: int, guidance_dim: int, resolution: Tuple[int, int], num_heads: int,
                 window_size: int, shift_size: int):
        super().__init__()
        if resolution[0] % window_size or resolution[1] % window_size:
            raise ValueError(f"FEATURE_RESOLUTION {tuple(resolution)} must be a multiple of WINDOW_SIZES {window_size}")
        self.resolution = tuple(resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=4 * dim)
        if shift_size > 0:
            self.register_buffer("attn_mask", shifted_window_mask(self.resolution, window_size, shift_size))
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (N, H*W, C); guidance: (N, H*W, G) or None. Returns (N, H*W, C)."""
        h, w = self.resolution
        n, length, c = x.shape
        shortcut = x
        x = self.norm1(x).view(n, h, w, c)
        if guidance is not None:
            x = torch.cat([x, guidance.view(n, h, w, -1)], dim=-1)
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window_size), mask=self.attn_mask)
        x = window_reverse(windows, self.window_size, h, w)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + x.reshape(n, length, c)
        return x + self.mlp(self.norm2(x))


class SwinTransformerBlockWrapper(nn.Module):
    """Spatial aggregation: a window block then a shifted-window block, per class slice."""

    def __init__(self, dim: int, guidance_dim: int, resolution: Tuple[int, int], nheads: int, window_size: int):
        super().__init__()
        self.block_1 = SwinTransformerBlock(dim, guidance_dim, resolution, nheads, window_size, 0)
        self.block_2 = SwinTransformerBlock(dim, guidance_dim, resolution, nheads, window_size, window_size // 2)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B, C, T, H, W); guidance: (B, G, H, W) or None. Returns (B, C, T, H, W)."""
        b, _, t, h, w = x.shape
        x = rearrange(x, "b c t h w -> (b t) (h w) c")
        if guidance is not None:
            guidance = self.guidance_norm(repeat(guidance, "b c h w -> (b t) (h w) c", t=t))
        x = self.block_1(x, guidance)
        x = self.block_2(x, guidance)
        return rearrange(x, "(b t) (h w) c -> b c t h w", b=b, h=h, w=w)


class ClassTransformerLayer(nn.Module):
    """Class aggregation: attention across the T classes at each (pooled) position."""

    def __init__(self, hidden_dim: int, guidance_dim: int, nheads: int, attention_type: str,
                 pooling_size: Sequence[int]):
        super().__init__()
        self.pool = nn.AvgPool2d(tuple(pooling_size))
        self.attention = AttentionLayer(hidden_dim, guidance_dim, nheads=nheads, attention_type=attention_type)
        self.MLP = nn.Sequential(nn.Linear(hidden_dim, 4 * hidden_dim), nn.ReLU(), nn.Linear(4 * hidden_dim, hidden_dim))
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B, C, T, H, W); guidance: (B, T, G) or None. Returns (B, C, T, H, W).

        The pooled branch keeps its own residual and is then added to x again (official).
        """
        b, _, t, h, w = x.shape
        pooled = self.pool(rearrange(x, "b c t h w -> (b t) c h w"))
        ph, pw = pooled.shape[-2:]
        pooled = rearrange(pooled, "(b t) c h w -> (b h w) t c", b=b)
        if guidance is not None:
            guidance = repeat(guidance, "b t c -> (b h w) t c", h=ph, w=pw)
        pooled = pooled + self.attention(self.norm1(pooled), guidance)
        pooled = pooled + self.MLP(self.norm2(pooled))
        pooled = rearrange(pooled, "(b h w) t c -> (b t) c h w", h=ph, w=pw)
        pooled = F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=True)
        return x + rearrange(pooled, "(b t) c h w -> b c t h w", b=b)


class AggregatorLayer(nn.Module):
    """One spatial aggregation followed by one class aggregation."""

    def __init__(self, hidden_dim: int, text_guidance_dim: int, appearance_guidance_dim: int, nheads: int,
                 resolution: Tuple[int, int], pooling_size: Sequence[int], window_size: int, attention_type: str):
        super().__init__()
        self.swin_block = SwinTransformerBlockWrapper(hidden_dim, appearance_guidance_dim, resolution, nheads,
                                                      window_size)
        self.attention = ClassTransformerLayer(hidden_dim, text_guidance_dim, nheads, attention_type, pooling_size)

    def forward(self, x, appearance_guidance, text_guidance):
        """x: (B, C, T, H, W); appearance_guidance: (B, G, H, W); text_guidance: (B, T, G')."""
        return self.attention(self.swin_block(x, appearance_guidance), text_guidance)


class DoubleConv(nn.Module):
    """(3x3 conv without bias, GroupNorm(out // 16), ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        groups = out_channels // 16
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Up(nn.Module):
    """x2 transposed-conv upsampling, concatenation of projected guidance, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B*T, C, h, w); guidance: (B, G, 2h, 2w) or None. Returns (B*T, C_out, 2h, 2w)."""
        x = self.up(x)
        if guidance is not None:
            guidance = repeat(guidance, "b c h w -> (b t) c h w", t=x.shape[0] // guidance.shape[0])
            x = torch.cat([x, guidance], dim=1)
        return self.conv(x)


class Aggregator(nn.Module):
    """Cost volume -> aggregation layers -> decoder. See `forward` for shapes."""

    def __init__(
        self,
        text_guidance_dim: int = 512,
        text_guidance_proj_dim: int = 128,
        appearance_guidance_dim: int = 512,
        appearance_guidance_proj_dim: int = 128,
        decoder_dims: Sequence[int] = (64, 32),
        decoder_guidance_dims: Sequence[int] = (256, 128),
        decoder_guidance_proj_dims: Sequence[int] = (32, 16),
        num_layers: int = 4,
        nheads: int = 4,
        hidden_dim: int = 128,
        pooling_size: Sequence[int] = (2, 2),
        feature_resolution: Sequence[int] = (24, 24),
        window_size: int = 12,
        attention_type: str = "linear",
        prompt_channel: int = 80,
    ):
        super().__init__()
        self.layers = nn.ModuleList([
            AggregatorLayer(hidden_dim, text_guidance_proj_dim, appearance_guidance_proj_dim, nheads,
                            tuple(feature_resolution), pooling_size, window_size, attention_type)
            for _ in range(num_layers)
        ])
        self.conv1 = nn.Conv2d(prompt_channel, hidden_dim, kernel_size=7, stride=1, padding=3)
        self.guidance_projection = nn.Sequential(
            nn.Conv2d(appearance_guidance_dim, appearance_guidance_proj_dim, 3, padding=1), nn.ReLU()
        ) if appearance_guidance_dim > 0 else None
        self.text_guidance_projection = nn.Sequential(
            nn.Linear(text_guidance_dim, text_guidance_proj_dim), nn.ReLU()
        ) if text_guidance_dim > 0 else None
        self.decoder_guidance_projection = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d, dp, 3, padding=1), nn.ReLU())
            for d, dp in zip(decoder_guidance_dims, decoder_guidance_proj_dims)
        ]) if decoder_guidance_dims and decoder_guidance_dims[0] > 0 else None
        self.decoder1 = Up(hidden_dim, decoder_dims[0], decoder_guidance_proj_dims[0])
        self.decoder2 = Up(decoder_dims[0], decoder_dims[1], decoder_guidance_proj_dims[1])
        self.head = nn.Conv2d(decoder_dims[1], 1, kernel_size=3, padding=1)

    @staticmethod
    def correlation(img_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Cosine cost volume. img_feats (B, C, H, W), text_feats (B, T, P, C) -> (B, P, T, H, W)."""
        img_feats = F.normalize(img_feats, dim=1)
        text_feats = F.normalize(text_feats, dim=-1)
        return torch.einsum("bchw,btpc->bpthw", img_feats, text_feats)

    def corr_embed(self, corr: torch.Tensor) -> torch.Tensor:
        """(B, P, T, H, W) -> (B, hidden, T, H, W): a 7x7 conv with the templates as channels."""
        b = corr.shape[0]
        x = self.conv1(rearrange(corr, "b p t h w -> (b t) p h w"))
        return rearrange(x, "(b t) c h w -> b c t h w", b=b)

    def conv_decoder(self, x: torch.Tensor, guidance: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """(B, C, T, H, W) and guidance at 2x and 4x -> logits (B, T, 4H, 4W)."""
        b = x.shape[0]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = self.decoder1(x, guidance[0])
        x = self.decoder2(x, guidance[1])
        return rearrange(self.head(x), "(b t) () h w -> b t h w", b=b)

    def forward(self, img_feats: torch.Tensor, text_feats: torch.Tensor, appearance_guidance: Sequence[torch.Tensor]):
        """
        Args:
            img_feats: (B, C, H, W) dense CLIP features.
            text_feats: (B, T, P, C) text embeddings.
            appearance_guidance: backbone features deepest first: (B, G0, H, W), (B, G1, 2H, 2W), (B, G2, 4H, 4W).
        Returns:
            (B, T, 4H, 4W) logits.
        """
        corr_embed = self.corr_embed(self.correlation(img_feats, text_feats))
        guidance, text_guidance, decoder_guidance = None, None, [None, None]
        if self.guidance_projection is not None:
            guidance = self.guidance_projection(appearance_guidance[0])
        if self.decoder_guidance_projection is not None:
            decoder_guidance = [proj(g) for proj, g in zip(self.decoder_guidance_projection, appearance_guidance[1:])]
        if self.text_guidance_projection is not None:
            text_guidance = self.text_guidance_projection(F.normalize(text_feats.mean(dim=-2), dim=-1))
        for layer in self.layers:
            corr_embed = layer(corr_embed, guidance, text_guidance)
        return self.conv_decoder(corr_embed, decoder_guidance)
