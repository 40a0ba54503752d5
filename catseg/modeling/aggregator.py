"""Cost aggregation: cost volume, spatial + class aggregation layers, guided upsampling decoder.

Notation: B images (views), T classes, P prompt templates, C channels, H x W the CLIP token grid.
Module names and parameter shapes follow the official implementation, so released checkpoints
load unchanged; the computation is rearranged without changing its result:

- the aggregator state is kept channel-last, (B, T, H, W, C), so no stage transposes it;
- work that does not depend on the class runs once per image and is broadcast over classes:
  guidance LayerNorm, the guidance half of every q / k projection (a linear map of a
  concatenation is the sum of two linear maps; weights are split at use time), the guidance
  half of the decoder's first convolutions (a convolution is linear in its input channels);
- window attention uses the fused `scaled_dot_product_attention` with the additive mask;
- the spatial blocks and the decoder are independent per class and run over class chunks, the
  class attention over chunks of positions, so peak memory follows a budget at any T.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from .attention import AttentionLayer


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, window * window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B, nW, window * window, C) -> (B, H, W, C); inverse of `window_partition`."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


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
    ids = window_partition(region, window)[0, ..., 0]  # (nW, window^2)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def chunk_slices(total: int, size: int) -> List[slice]:
    """Consecutive slices of at most `size` covering range(total)."""
    return [slice(i, min(i + size, total)) for i in range(0, total, max(1, size))]


def over_chunks(fn: Callable[[slice], torch.Tensor], total: int, size: int, dim: int = 1,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Concatenation along `dim` of fn(s) over `chunk_slices(total, size)`, written chunk by chunk
    into `out` (allocated from the first chunk when None); one chunk returns fn's result as is.

    `out` may be the tensor fn reads from, as long as fn reads its own slice only.
    """
    slices = chunk_slices(total, size)
    if len(slices) == 1 and out is None:
        return fn(slices[0])
    for s in slices:
        y = fn(s)
        if out is None:
            out = y.new_empty(y.shape[:dim] + (total,) + y.shape[dim + 1:])
        out[(slice(None),) * dim + (s,)] = y
    return out


class WindowAttention(nn.Module):
    """Window self-attention whose queries and keys see the appearance guidance.

    q, k = Linear([x, guidance]); v = Linear(x); no relative position bias. The guidance half
    of q / k (`guidance_terms`) is computed once per image, not once per class.
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

    def guidance_terms(self, guidance: torch.Tensor) -> torch.Tensor:
        """(B, nW, N, G) guidance windows -> (B, nW, N, 2C): the guidance part of [q, k]."""
        c = self.dim
        return F.linear(guidance, torch.cat([self.q.weight[:, c:], self.k.weight[:, c:]]))

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B * t, nW, N, C) windows of t class slices per image (image-major); guidance:
        (B, nW, N, 2C) from `guidance_terms`, or None; mask: (nW, N, N) additive, or None.
        Returns (B * t, nW, N, C)."""
        n, nw, length, c = x.shape
        qk = F.linear(x, torch.cat([self.q.weight[:, :c], self.k.weight[:, :c]]), torch.cat([self.q.bias, self.k.bias]))
        if guidance is not None:
            qk.view(guidance.shape[0], -1, nw, length, 2 * c).add_(guidance.unsqueeze(1))
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)  # noqa: E731  (n, nW, h, N, d)
        q, k, v = heads(qk[..., :c]), heads(qk[..., c:]), heads(self.v(x))
        if mask is None:
            out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), scale=self.scale)
            out = out.unflatten(0, (n, nw))
        else:  # one call per window position: each has its own mask, shared by all slices
            out = torch.stack([F.scaled_dot_product_attention(q[:, i], k[:, i], v[:, i], attn_mask=mask[i].to(q.dtype),
                                                              scale=self.scale) for i in range(nw)], dim=1)
        return self.proj(out.transpose(-3, -2).flatten(-2))


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

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, nW, window^2, C) after the cyclic shift."""
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        return window_partition(x, self.window_size)

    def guidance_terms(self, guidance: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Normalised guidance (B, H, W, G) -> (B, nW, N, 2C) q / k terms; None stays None."""
        return None if guidance is None else self.attn.guidance_terms(self.windows(guidance))

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B * t, H, W, C) class slices (image-major); guidance: `guidance_terms` output or None.
        Returns (B * t, H, W, C)."""
        h, w = self.resolution
        y = self.attn(self.windows(self.norm1(x)), guidance, self.attn_mask)
        y = window_reverse(y, self.window_size, h, w)
        if self.shift_size:
            y = torch.roll(y, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class SwinTransformerBlockWrapper(nn.Module):
    """Spatial aggregation: a window block then a shifted-window block, per class slice."""

    def __init__(self, dim: int, guidance_dim: int, resolution: Tuple[int, int], nheads: int, window_size: int):
        super().__init__()
        self.block_1 = SwinTransformerBlock(dim, guidance_dim, resolution, nheads, window_size, 0)
        self.block_2 = SwinTransformerBlock(dim, guidance_dim, resolution, nheads, window_size, window_size // 2)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None

    def guidance_terms(self, guidance: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """(B, G, H, W) or None -> per block, its (B, nW, N, 2C) q / k guidance terms (or None)."""
        if guidance is None:
            return [None, None]
        guidance = self.guidance_norm(guidance.permute(0, 2, 3, 1))
        return [self.block_1.guidance_terms(guidance), self.block_2.guidance_terms(guidance)]

    def forward(self, x: torch.Tensor, guidance: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """x: (B * t, H, W, C) class slices (image-major); guidance: `guidance_terms` output.
        Returns (B * t, H, W, C)."""
        return self.block_2(self.block_1(x, guidance[0]), guidance[1])


class ClassTransformerLayer(nn.Module):
    """Class aggregation: attention across the T classes at each (pooled) position."""

    def __init__(self, hidden_dim: int, guidance_dim: int, nheads: int, attention_type: str,
                 pooling_size: Sequence[int], test_pooling_size: Sequence[int] = ()):
        super().__init__()
        self.pool = nn.AvgPool2d(tuple(pooling_size))
        # inference may pool differently (official evaluation protocol: no pooling)
        self.test_pool = nn.AvgPool2d(tuple(test_pooling_size or pooling_size))
        self.attention = AttentionLayer(hidden_dim, guidance_dim, nheads=nheads, attention_type=attention_type)
        self.MLP = nn.Sequential(nn.Linear(hidden_dim, 4 * hidden_dim), nn.ReLU(), nn.Linear(4 * hidden_dim, hidden_dim))
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)

    def transform(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """Pre-norm attention + MLP, both residual. x: (B, T, M, C); guidance: (B, T, G) or None."""
        x = x + self.attention(self.norm1(x), guidance)
        return x + self.MLP(self.norm2(x))

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor], chunk: int = 0) -> torch.Tensor:
        """x: (B, T, H, W, C); guidance: (B, T, G) or None; chunk: positions per chunk (0: all).
        Returns (B, T, H, W, C); without autograd, written into x.

        The pooled branch keeps its own residual and is then added to x again (official).
        """
        b, t, h, w, c = x.shape
        in_place = not torch.is_grad_enabled()
        pool = self.pool if self.training else self.test_pool
        if tuple(pool.kernel_size) == (1, 1):  # pooling and resizing back are identities
            flat = x.view(b, t, h * w, c)
            step = lambda s: flat[:, :, s] + self.transform(flat[:, :, s], guidance)  # noqa: E731
            return over_chunks(step, h * w, chunk or h * w, dim=2, out=flat if in_place else None).view_as(x)
        pooled = pool(x.view(b * t, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        ph, pw = pooled.shape[1:3]
        pooled = pooled.reshape(b, t, ph * pw, c)
        pooled = over_chunks(lambda s: self.transform(pooled[:, :, s], guidance), ph * pw, chunk or ph * pw, dim=2)
        pooled = pooled.view(b * t, ph, pw, c).permute(0, 3, 1, 2)
        up = F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
        up = up.reshape(b, t, h, w, c)
        return x.add_(up) if in_place else x + up


class AggregatorLayer(nn.Module):
    """One spatial aggregation followed by one class aggregation."""

    def __init__(self, hidden_dim: int, text_guidance_dim: int, appearance_guidance_dim: int, nheads: int,
                 resolution: Tuple[int, int], pooling_size: Sequence[int], window_size: int, attention_type: str,
                 test_pooling_size: Sequence[int] = ()):
        super().__init__()
        self.swin_block = SwinTransformerBlockWrapper(hidden_dim, appearance_guidance_dim, resolution, nheads,
                                                      window_size)
        self.attention = ClassTransformerLayer(hidden_dim, text_guidance_dim, nheads, attention_type, pooling_size,
                                               test_pooling_size)


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

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B * t, C_x, h, w), the leading C_x input channels; guidance: (B, C_out, h, w), the first
        convolution of the remaining (guidance) input channels, or None. Returns (B * t, C_out, h, w)."""
        layers = self.double_conv
        y = F.conv2d(x, layers[0].weight[:, : x.shape[1]], padding=1)
        if guidance is not None:
            y.view(guidance.shape[0], -1, *y.shape[1:]).add_(guidance.unsqueeze(1))
        for layer in layers[1:]:
            y = layer(y)
        return y


class Up(nn.Module):
    """x2 transposed-conv upsampling, concatenation of projected guidance, DoubleConv.

    The concatenation is never built: the first convolution's guidance channels are applied
    once per image (`guidance_term`) and added to every class slice.
    """

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def guidance_term(self, guidance: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(B, G, 2h, 2w) projected guidance or None -> (B, C_out, 2h, 2w) or None."""
        if guidance is None:
            return None
        return F.conv2d(guidance, self.conv.double_conv[0].weight[:, self.up.out_channels:], padding=1)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B * t, C, h, w) image-major; guidance: `guidance_term` output. Returns (B * t, C_out, 2h, 2w)."""
        return self.conv(self.up(x), guidance)


class Aggregator(nn.Module):
    """Cost volume -> aggregation layers -> decoder. See `forward` for shapes.

    Without autograd the class-independent stages run over chunks of classes (all views of a
    class together) sized by `class_chunk_size`, or, when 0, by `memory_budget_mb` for their
    activations; the class attention runs over chunks of positions under the same budget.
    """

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
        test_pooling_size: Sequence[int] = (),
        feature_resolution: Sequence[int] = (24, 24),
        window_size: int = 12,
        attention_type: str = "linear",
        prompt_channel: int = 80,
        class_chunk_size: int = 0,
        memory_budget_mb: float = 1024,
    ):
        super().__init__()
        self.class_chunk_size = class_chunk_size
        self.memory_budget_mb = memory_budget_mb
        self.layers = nn.ModuleList([
            AggregatorLayer(hidden_dim, text_guidance_proj_dim, appearance_guidance_proj_dim, nheads,
                            tuple(feature_resolution), pooling_size, window_size, attention_type, test_pooling_size)
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

    def slice_bytes(self, h: int, w: int) -> int:
        """Estimated peak activation bytes of one class of one view in the spatial blocks or the
        decoder, whichever is larger (fp32; a dozen live tensors of the widest layer)."""
        hidden = self.conv1.out_channels
        spatial = h * w * (self.conv1.in_channels + 12 * hidden)
        d1, d2 = self.decoder1.conv.double_conv[0], self.decoder2.conv.double_conv[0]
        decoder = 4 * h * w * (hidden + 4 * d1.out_channels) + 16 * h * w * (d1.out_channels + 4 * d2.out_channels)
        return 4 * max(spatial, decoder)

    def chunk_sizes(self, views: int, classes: int, h: int, w: int) -> Tuple[int, int]:
        """(classes per chunk, positions per chunk of the class attention) for this input."""
        if torch.is_grad_enabled():
            return classes, h * w
        budget = self.memory_budget_mb * 2 ** 20
        per_class = self.class_chunk_size or max(1, int(budget // (views * self.slice_bytes(h, w))))
        per_position = max(1, int(budget // (views * classes * 4 * 16 * self.conv1.out_channels)))
        return min(per_class, classes), min(per_position, h * w)

    def embed(self, img_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Cosine cost volume through conv1, the P templates as channels.

        img_feats (B, C, H, W) L2-normalised; text_feats (B, t, P, C). Returns (B * t, H, W, hidden).
        """
        corr = torch.einsum("bchw,btpc->bthwp", img_feats, F.normalize(text_feats, dim=-1))
        x = self.conv1(corr.flatten(0, 1).permute(0, 3, 1, 2))  # channels-last in, channels-last out
        return x.permute(0, 2, 3, 1)

    def forward(self, img_feats: torch.Tensor, text_feats: torch.Tensor, appearance_guidance: Sequence[torch.Tensor]):
        """
        Args:
            img_feats: (B, C, H, W) dense CLIP features.
            text_feats: (B, T, P, C) text embeddings.
            appearance_guidance: backbone features deepest first: (B, G0, H, W), (B, G1, 2H, 2W), (B, G2, 4H, 4W).
        Returns:
            (B, T, 4H, 4W) logits.
        """
        b, t = text_feats.shape[:2]
        h, w = img_feats.shape[-2:]
        img_feats = F.normalize(img_feats, dim=1)
        guidance, text_guidance, decoder_guidance = None, None, [None, None]
        if self.guidance_projection is not None:
            guidance = self.guidance_projection(appearance_guidance[0])
        if self.decoder_guidance_projection is not None:
            decoder_guidance = [proj(g) for proj, g in zip(self.decoder_guidance_projection, appearance_guidance[1:])]
        if self.text_guidance_projection is not None:
            text_guidance = self.text_guidance_projection(F.normalize(text_feats.mean(dim=-2), dim=-1))
        spatial_guidance = [layer.swin_block.guidance_terms(guidance) for layer in self.layers]
        decoder_guidance = [self.decoder1.guidance_term(decoder_guidance[0]),
                            self.decoder2.guidance_term(decoder_guidance[1])]
        per_class, per_position = self.chunk_sizes(b, t, h, w)
        in_place = not torch.is_grad_enabled()

        def spatial(i: int, x: Optional[torch.Tensor]):
            def step(s: slice) -> torch.Tensor:
                x_s = self.embed(img_feats, text_feats[:, s]) if x is None else x[:, s].flatten(0, 1)
                return self.layers[i].swin_block(x_s, spatial_guidance[i]).unflatten(0, (b, -1))
            return over_chunks(step, t, per_class, out=x if in_place else None)

        x = None
        for i, layer in enumerate(self.layers):
            x = layer.attention(spatial(i, x), text_guidance, per_position)

        def decode(s: slice) -> torch.Tensor:
            y = x[:, s].flatten(0, 1).permute(0, 3, 1, 2)
            y = self.decoder2(self.decoder1(y, decoder_guidance[0]), decoder_guidance[1])
            return self.head(y).unflatten(0, (b, -1)).squeeze(2)
        return over_chunks(decode, t, per_class)
