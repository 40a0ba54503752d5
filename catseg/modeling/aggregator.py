"""Cost aggregation: cost volume, spatial + class aggregation layers, guided upsampling decoder.

Notation: B images (views), T classes, P prompt templates, C channels, H x W the CLIP token grid.
Module names and parameter shapes follow the official implementation, so released checkpoints
load unchanged; the computation is rearranged without changing its result (up to float
rounding):

- the aggregator state is kept channel-last, (B, T, H, W, C), so no stage transposes it whole;
- work that does not depend on the class runs once per image and is broadcast over classes:
  guidance LayerNorm, the guidance half of every q / k projection (a linear map of a
  concatenation is the sum of two linear maps; weights are split at use time), the guidance
  half of the decoder's first convolutions (a convolution is linear in its input channels);
- the spatial blocks run in window order (gathers instead of partition / roll / reverse) with
  the fused `scaled_dot_product_attention` and the additive shifted-window mask;
- the decoder composes each transposed convolution with the following 3x3 convolution (one 2x2
  convolution per output phase, see `Up`) and runs channels-last;
- the spatial blocks and the decoder are independent per class and run over class chunks, the
  class attention over chunks of positions, so peak memory follows a budget at any T; without
  autograd, residuals and activations are computed in place.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from .attention import AttentionLayer, per_window_attention
from .inplace import mlp, residual


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, window * window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


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


def chunk_size(total: int, bytes_per_item: int, budget_mb: float) -> int:
    """Items per chunk so that one chunk's temporaries (`bytes_per_item` per item) stay within
    `budget_mb`; at least 1, at most `total`."""
    return max(1, min(total, int(budget_mb * 2 ** 20 // max(1, bytes_per_item))))


def chunk_budget_mb(budget_mb: float, cpu_chunk_mb: float, device: torch.device) -> float:
    """MB of activations one chunk may use: `budget_mb`, capped on CPU by `cpu_chunk_mb` (> 0).

    On CPU small chunks are faster: their temporaries stay in cache, and below glibc's mmap
    threshold (32 MB at most) freed memory is reused instead of being mapped and faulted in again.
    """
    return min(budget_mb, cpu_chunk_mb) if device.type == "cpu" and cpu_chunk_mb > 0 else budget_mb


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
    of q / k (`guidance_terms`) is computed once per image, not once per class; q, k and v of
    the class slices come from one matrix product.
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
        weight = torch.cat([self.q.weight[:, :c], self.k.weight[:, :c], self.v.weight])
        qkv = F.linear(x, weight, torch.cat([self.q.bias, self.k.bias, self.v.bias]))
        if guidance is not None:  # in place: the linear map's backward does not need its output
            qkv[..., : 2 * c].view(guidance.shape[0], -1, nw, length, 2 * c).add_(guidance.unsqueeze(1))
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2) for t in qkv.split(c, dim=-1))
        if mask is None:  # (n * nW, heads, N, d) views; the kernel accepts the strides
            out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), scale=self.scale)
            out = out.unflatten(0, (n, nw))
        else:
            out = per_window_attention(q, k, v, mask.unsqueeze(1), scale=self.scale)
        return self.proj(out.transpose(-3, -2).flatten(-2))


def window_order(resolution: Tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """(H * W,) row-major position indices listed window by window after a cyclic shift by
    `shift`: gathering a (.., H * W, C) map with it gives the (.., nW, window^2, C) windows."""
    h, w = resolution
    grid = torch.arange(h * w).view(1, h, w, 1)
    if shift:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(grid, window).flatten()


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention block over one cost slice, guided by appearance.

    Works in window order: its input and output are the (B * t, nW, window^2, C) windows that
    gathering the map with `order` gives (the cyclic shift included), so no partition, reverse
    or roll is done inside the block.
    """

    def __init__(self, dim: int, guidance_dim: int, resolution: Tuple[int, int], num_heads: int,
                 window_size: int, shift_size: int):
        super().__init__()
        if resolution[0] % window_size or resolution[1] % window_size:
            raise ValueError(f"FEATURE_RESOLUTION {tuple(resolution)} must be a multiple of WINDOW_SIZES {window_size}")
        self.resolution = tuple(resolution)
        self.window_size = window_size
        self.num_windows = resolution[0] * resolution[1] // window_size ** 2
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=4 * dim)
        if shift_size > 0:
            self.register_buffer("attn_mask", shifted_window_mask(tuple(resolution), window_size, shift_size))
        else:
            self.attn_mask = None
        self.register_buffer("order", window_order(tuple(resolution), window_size, shift_size), persistent=False)

    def guidance_terms(self, guidance: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Normalised guidance (B, H * W, G) -> (B, nW, N, 2C) q / k terms; None stays None."""
        if guidance is None:
            return None
        return self.attn.guidance_terms(guidance[:, self.order].unflatten(1, (self.num_windows, -1)))

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B * t, nW, N, C) class slices in window order (image-major); guidance:
        `guidance_terms` output or None. Returns (B * t, nW, N, C)."""
        x = residual(x, self.attn(self.norm1(x), guidance, self.attn_mask))
        hidden = self.norm2(x)  # timm Mlp without its dropouts (rates are 0)
        return residual(x, mlp(self.mlp.fc1, self.mlp.fc2, hidden, F.gelu, torch.ops.aten.gelu_))


class SwinTransformerBlockWrapper(nn.Module):
    """Spatial aggregation: a window block then a shifted-window block, per class slice.

    The map is gathered into the first block's window order, from there into the second's,
    and back to row-major: three copies per wrapper.
    """

    def __init__(self, dim: int, guidance_dim: int, resolution: Tuple[int, int], nheads: int, window_size: int):
        super().__init__()
        self.block_1 = SwinTransformerBlock(dim, guidance_dim, resolution, nheads, window_size, 0)
        self.block_2 = SwinTransformerBlock(dim, guidance_dim, resolution, nheads, window_size, window_size // 2)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None
        first, second = self.block_1.order, self.block_2.order
        self.register_buffer("first_to_second", torch.argsort(first)[second], persistent=False)
        self.register_buffer("second_to_map", torch.argsort(second), persistent=False)

    def guidance_terms(self, guidance: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """(B, G, H, W) or None -> per block, its (B, nW, N, 2C) q / k guidance terms (or None)."""
        if guidance is None:
            return [None, None]
        guidance = self.guidance_norm(guidance.flatten(2).transpose(1, 2))
        return [self.block_1.guidance_terms(guidance), self.block_2.guidance_terms(guidance)]

    def forward(self, x: torch.Tensor, guidance: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """x: (B * t, H, W, C) class slices (image-major); guidance: `guidance_terms` output.
        Returns (B * t, H, W, C)."""
        windows = lambda t, order: t[:, order].unflatten(1, (self.block_1.num_windows, -1))  # noqa: E731
        y = self.block_1(windows(x.flatten(1, 2), self.block_1.order), guidance[0])
        y = self.block_2(windows(y.flatten(1, 2), self.first_to_second), guidance[1])
        return y.flatten(1, 2)[:, self.second_to_map].view_as(x)


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

    def transform(self, x: torch.Tensor, qk_bias: torch.Tensor) -> torch.Tensor:
        """Pre-norm attention + MLP, both residual. x: (B, M, T, C); qk_bias: (B, 1, T, 2C) or (2C,)."""
        x = x + self.attention(self.norm1(x), qk_bias)
        return residual(x, mlp(self.MLP[0], self.MLP[2], self.norm2(x), F.relu, torch.relu_))

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor], chunk: int = 0) -> torch.Tensor:
        """x: (B, T, H, W, C); guidance: (B, T, G) or None; chunk: positions per chunk (0: all).
        Returns (B, T, H, W, C); without autograd, written into x.

        Each chunk of positions is moved to (B, M, T, C) so that every product runs over
        contiguous class sequences. The pooled branch keeps its own residual and is then added
        to x again (official).
        """
        b, t, h, w, c = x.shape
        in_place = not torch.is_grad_enabled()
        qk_bias = self.attention.qk_bias(guidance)
        qk_bias = qk_bias.unsqueeze(1) if guidance is not None else qk_bias
        pool = self.pool if self.training else self.test_pool
        if tuple(pool.kernel_size) == (1, 1):  # pooling and resizing back are identities
            flat = x.view(b, t, h * w, c)

            def step(s: slice) -> torch.Tensor:
                chunk_x = flat[:, :, s].transpose(1, 2)
                return residual(self.transform(chunk_x, qk_bias), chunk_x).transpose(1, 2)
            return over_chunks(step, h * w, chunk or h * w, dim=2, out=flat if in_place else None).view_as(x)
        pooled = pool(x.view(b * t, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        ph, pw = pooled.shape[1:3]
        pooled = pooled.reshape(b, t, ph * pw, c)
        pooled = over_chunks(lambda s: self.transform(pooled[:, :, s].transpose(1, 2), qk_bias).transpose(1, 2),
                             ph * pw, chunk or ph * pw, dim=2)
        pooled = pooled.reshape(b * t, ph, pw, c).permute(0, 3, 1, 2)
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
    """(3x3 conv without bias, GroupNorm(out // 16), ReLU) x 2. `Up` applies the first convolution
    itself (fused with the upsampling); `forward` runs the rest."""

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

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y: (N, C_out, h, w), the first convolution's output. Returns (N, C_out, h, w)."""
        for layer in self.double_conv[1:]:
            y = layer(y)
        return y


def phase_selection(device=None) -> torch.Tensor:
    """(2, 2, 3, 2) 0/1 tensor S[a, tap, k, phase]: output row 2i + a of a 3x3 convolution (padding
    1) over a x2 transposed-conv output reads, at kernel row k, the upsampled row of the given
    phase (row parity) inside input row i + a + tap - 1; tap is the row of a 2x2 kernel over the
    input padded by 1."""
    s = torch.zeros(2, 2, 3, 2, device=device)
    for a in range(2):
        for k in range(3):
            row = a + k - 1  # upsampled row offset from 2i
            s[a, row // 2 - a + 1, k, row % 2] = 1
    return s


class Up(nn.Module):
    """x2 transposed-conv upsampling, concatenation of projected guidance, DoubleConv.

    Computed without building either the upsampled map or the concatenation:
    - a 2x2 stride-2 transposed convolution followed by a 3x3 convolution is, for each of the
      four output phases (row and column parity), a 2x2 convolution of the input; the four
      kernels are composed from the two weights (`fused_weight`) and applied as one convolution
      with 4 x C_out channels, whose outputs interleave into the 2h x 2w map;
    - what does not depend on the class, the 3x3 convolution of the transposed conv's bias
      (zero padding makes it position-dependent at the border) and of the guidance channels,
      is computed once per image (`guidance_term`) and added to every class slice.
    """

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def fused_weight(self) -> torch.Tensor:
        """(4 * C_out, C_in, 2, 2): transposed conv then first convolution, phase-major (a, b)."""
        first = self.conv.double_conv[0].weight[:, : self.up.out_channels]  # (C_out, C_up, 3, 3)
        s = phase_selection(first.device).to(first.dtype)
        w = torch.einsum("aykm,bxln,pokl,comn->abpcyx", s, s, first, self.up.weight)
        return w.flatten(0, 2)

    def guidance_term(self, guidance: Optional[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """(B, G, 2h, 2w) projected guidance or None; size (2h, 2w) -> (B or 1, C_out, 2h, 2w)."""
        first = self.conv.double_conv[0].weight
        bias = self.up.bias.view(1, -1, 1, 1).expand(1, -1, *size)
        term = F.conv2d(bias, first[:, : self.up.out_channels], padding=1)
        if guidance is not None:
            term = term + F.conv2d(guidance, first[:, self.up.out_channels:], padding=1)
        return term.contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, term: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x: (B * t, C_in, h, w) image-major; term: `guidance_term` output; weight: `fused_weight()`.
        Returns (B * t, C_out, 2h, 2w)."""
        n, _, h, w = x.shape
        phases = F.conv2d(x, weight, padding=1).permute(0, 2, 3, 1).unflatten(-1, (2, 2, -1))  # (n, h+1, w+1, 2, 2, C)
        y = x.new_empty(n, h, 2, w, 2, phases.shape[-1])  # channels-last: oneDNN convolutions run faster
        for a in range(2):
            for b in range(2):
                y[:, :, a, :, b] = phases[:, a: a + h, b: b + w, a, b]
        y = y.view(n, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)
        y.view(term.shape[0], -1, *y.shape[1:]).add_(term.unsqueeze(1))
        return self.conv(y)


class Aggregator(nn.Module):
    """Cost volume -> aggregation layers -> decoder. See `forward` for shapes.

    Without autograd the class-independent stages run over chunks of classes (all views of a
    class together) sized by `class_chunk_size`, or, when 0, by `memory_budget_mb` for their
    activations (on CPU also by `cpu_chunk_mb`, see `chunk_budget_mb`); the class attention runs
    over chunks of positions under the same budget.
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
        cpu_chunk_mb: float = 0,
    ):
        super().__init__()
        self.class_chunk_size = class_chunk_size
        self.memory_budget_mb = memory_budget_mb
        self.cpu_chunk_mb = cpu_chunk_mb
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

    def chunk_sizes(self, views: int, classes: int, h: int, w: int,
                    device: torch.device = torch.device("cpu")) -> Tuple[int, int]:
        """(classes per chunk, positions per chunk of the class attention) for this input."""
        if torch.is_grad_enabled():
            return classes, h * w
        budget = chunk_budget_mb(self.memory_budget_mb, self.cpu_chunk_mb, device)
        per_class = (min(self.class_chunk_size, classes) if self.class_chunk_size
                     else chunk_size(classes, views * self.slice_bytes(h, w), budget))
        return per_class, chunk_size(h * w, views * classes * 4 * 16 * self.conv1.out_channels, budget)

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
        decoder_guidance = [self.decoder1.guidance_term(decoder_guidance[0], (2 * h, 2 * w)),
                            self.decoder2.guidance_term(decoder_guidance[1], (4 * h, 4 * w))]
        decoder_weights = [self.decoder1.fused_weight(), self.decoder2.fused_weight()]
        per_class, per_position = self.chunk_sizes(b, t, h, w, img_feats.device)
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
            y = self.decoder1(y, decoder_guidance[0], decoder_weights[0])
            y = self.decoder2(y, decoder_guidance[1], decoder_weights[1])
            return self.head(y).unflatten(0, (b, -1)).squeeze(2)
        return over_chunks(decode, t, per_class)
