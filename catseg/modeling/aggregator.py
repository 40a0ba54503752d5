"""Cost aggregation: cost volume, spatial + class aggregation layers, guided upsampling decoder.

Notation: B images (views), T classes, P prompt templates, C channels, H x W the CLIP token grid.
Module names and parameter shapes follow the official implementation, so released checkpoints
load unchanged.

Every module with a fast path follows one convention (timm's `fused_attn` pattern): `forward`
dispatches on the module's `fused` switch to `forward_fused`, the fast computation, or to
`forward_plain`, the computation in the official order; the three take the same arguments and
return the same type. Class-independent work that the two paths prepare differently (guidance
norms and projections) comes from the module's `prepare`, whose result is the `context`
argument. `set_fused(module, flag)` sets the switch everywhere below a module. The fast paths
compute the same result up to float rounding (tests/test_fused.py):

- the aggregator state is kept channel-last, (B, T, H, W, C), so no stage transposes it whole;
- work that does not depend on the class runs once per image and is broadcast over classes
  (each module's `prepare`): guidance LayerNorm, the guidance half of every q / k projection
  (a linear map of a concatenation is the sum of two linear maps; weights are split at use
  time), the guidance half of the decoder's first convolutions (a convolution is linear in its
  input channels);
- the spatial blocks run in window order (gathers instead of partition / roll / reverse) with
  the fused `scaled_dot_product_attention` and the additive shifted-window mask;
- the decoder composes each transposed convolution with the following 3x3 convolution (one 2x2
  convolution per output phase, see `Up`) and runs channels-last;
- CVPR'24 class padding: the identical padding tokens enter the linear attention as one rank-1
  term, and their MLP and upsampling, whose outputs are discarded, are skipped;
- without autograd, the spatial blocks and the decoder run over class chunks and the class
  attention over chunks of positions, so peak memory follows a `ChunkBudget` at any T, and
  residuals and activations are computed in place;
- in training, the spatial blocks and the decoder run over class chunks too (the backward pass
  then works chunk by chunk), the cheap intermediates are recomputed in the backward pass
  instead of stored (`lean_autograd`), and with `checkpoint` (CHECKPOINT_ACTIVATIONS) each
  chunk and each class attention is recomputed whole.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import Mlp
from torch import nn

from .attention import AttentionLayer, ExtraTokens, per_window_attention
from .chunking import (
    ChunkBudget,
    class_attention_bytes_per_position,
    decoder_bytes_per_class,
    embedding_bytes_per_class,
    over_chunks,
    selection_bytes_per_class,
    spatial_bytes_per_class,
)
from .epilogue_linear import apply_linear, linear
from .inplace import mlp, residual
from .lean_autograd import (
    PreActivation,
    conv_after,
    fused_attention_backward_available,
    interleave_phases,
    norm_linear,
    norm_mlp,
    norm_qkv_attention,
    permute_rows,
    use_lean,
)
from .tap_conv import conv_by_taps


def set_fused(module: nn.Module, fused: bool) -> None:
    """Switch every fast path under `module` on or off (modules with a `fused` attribute)."""
    for m in module.modules():
        if hasattr(m, "fused"):
            m.fused = fused


def checkpointed(fn: Callable) -> Callable:
    """fn with activation checkpointing: only its inputs are stored, its forward runs again in
    the backward pass (exact: the same operations on the same values)."""
    return lambda *args: torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def over_class_chunks(fn: Callable, x: torch.Tensor, size: int, checkpoint: bool) -> torch.Tensor:
    """Training: fn over (B, size, ...) class chunks of x, concatenated along the classes
    (split / cat: their backward passes are views); each chunk `checkpointed` when asked."""
    fn = checkpointed(fn) if checkpoint else fn
    return torch.cat([fn(xs) for xs in x.split(size, dim=1)], dim=1)


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


def window_order(resolution: Tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """(H * W,) row-major position indices listed window by window after a cyclic shift by
    `shift`: gathering a (.., H * W, C) map with it gives the (.., nW, window^2, C) windows."""
    h, w = resolution
    grid = torch.arange(h * w).view(1, h, w, 1)
    if shift:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(grid, window).flatten()


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
        self.fused = True

    def guidance_terms(self, guidance: torch.Tensor) -> torch.Tensor:
        """(B, nW, N, G) guidance windows -> (B, nW, N, 2C): the guidance part of [q, k]."""
        c = self.dim
        return F.linear(guidance, torch.cat([self.q.weight[:, c:], self.k.weight[:, c:]]))

    def packed_qkv(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(3C, C) weight and (3C,) bias of [q; k; v] on the class slice (the guidance halves of
        q / k are `guidance_terms`)."""
        c = self.dim
        weight = torch.cat([self.q.weight[:, :c], self.k.weight[:, :c], self.v.weight])
        return weight, torch.cat([self.q.bias, self.k.bias, self.v.bias])

    def prepare(self, guidance: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(B, nW, N, G) guidance windows or None -> the `forward` context: fused, the
        (B, nW, N, 2C) guidance part of q / k (`guidance_terms`); plain, the windows."""
        if guidance is None or not self.fused:
            return guidance
        return self.guidance_terms(guidance)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """x: (B * t, nW, N, C) windows of t class slices per image (image-major), normalised here
        by `norm` when given; context: `prepare` output (per image, or already per slice);
        mask: (nW, N, N) additive, or None. Returns (B * t, nW, N, C)."""
        if self.fused:
            return self.forward_fused(x, context, mask, norm)
        return self.forward_plain(x, context, mask, norm)

    def forward_fused(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None, norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """Fused path: q, k and v of the class slices from one matrix product, the guidance part
        of q / k (context: `guidance_terms`, (B, nW, N, 2C)) added per image.

        In training (`lean_autograd.use_lean`) q, k and v are not stored: the backward pass
        computes them again from x (one matrix product; on CPU `lean_autograd.norm_qkv_attention`
        then runs the fused kernel's backward from the stored output, elsewhere the attention
        forward runs again), which keeps three quarters of the block's attention activations out
        of memory."""
        if norm is not None and use_lean(x) and fused_attention_backward_available(x):
            out = norm_qkv_attention(x, norm, *self.packed_qkv(), context, self.num_heads, self.scale, mask)
        elif norm is not None and use_lean(x):
            out = checkpointed(self.attend)(x, context, mask, norm)
        else:
            out = self.attend(x, context, mask, norm)
        return apply_linear(self.proj, out.transpose(-3, -2).flatten(-2))

    def attend(self, x: torch.Tensor, guidance: Optional[torch.Tensor], mask: Optional[torch.Tensor],
               norm: Optional[nn.LayerNorm]) -> torch.Tensor:
        """`forward_fused` before the output projection: (B * t, nW, heads, N, d)."""
        n, nw, length, c = x.shape
        weight, bias = self.packed_qkv()
        if norm is not None and use_lean(x):
            qkv = norm_linear(x, norm, weight, bias, guidance)
        else:
            qkv = linear(x if norm is None else norm(x), weight, bias)
            if guidance is not None:  # in place: the linear map's backward does not need its output
                qkv[..., : 2 * c].view(guidance.shape[0], -1, nw, length, 2 * c).add_(guidance.unsqueeze(1))
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2) for t in qkv.split(c, dim=-1))
        if mask is None:  # (n * nW, heads, N, d) views; the kernel accepts the strides
            out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), scale=self.scale)
            return out.unflatten(0, (n, nw))
        return per_window_attention(q, k, v, mask.unsqueeze(1), scale=self.scale)

    def forward_plain(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None, norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """Plain path, as written: q, k = Linear([x, guidance]), v = Linear(x), softmax attention.
        context: (B, nW, N, G) guidance windows (repeated here to x's slices) or None."""
        x = x if norm is None else norm(x)
        if context is not None:
            context = context.repeat_interleave(x.shape[0] // context.shape[0], dim=0)
        xg = x if context is None else torch.cat([x, context], dim=-1)
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)  # noqa: E731 (N, nW, h, L, d)
        q, k, v = heads(self.q(xg)) * self.scale, heads(self.k(xg)), heads(self.v(x))
        attn = q @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn + mask.unsqueeze(1)
        out = torch.softmax(attn, dim=-1) @ v
        return self.proj(out.transpose(-3, -2).flatten(-2))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention block over one cost slice, guided by appearance.

    Both paths map (N, H, W, C) slices to (N, H, W, C). `forward_plain`: roll, partition,
    attention, reverse, roll back. `forward_fused`: gather the map into window order (`order`,
    the cyclic shift included), `window_step`, scatter back; `SwinTransformerBlockWrapper` chains
    two blocks' `window_step`s directly, with one gather between them.
    """

    def __init__(self, dim: int, guidance_dim: int, resolution: Tuple[int, int], num_heads: int,
                 window_size: int, shift_size: int):
        super().__init__()
        if resolution[0] % window_size or resolution[1] % window_size:
            raise ValueError(f"FEATURE_RESOLUTION {tuple(resolution)} must be a multiple of WINDOW_SIZES {window_size}")
        self.resolution = tuple(resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.num_windows = resolution[0] * resolution[1] // window_size ** 2
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=4 * dim)
        if shift_size > 0:
            self.register_buffer("attn_mask", shifted_window_mask(tuple(resolution), window_size, shift_size))
        else:
            self.attn_mask = None
        order = window_order(tuple(resolution), window_size, shift_size)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("order_inverse", torch.argsort(order), persistent=False)
        self.fused = True

    @property
    def fusable(self) -> bool:
        """The fused MLP skips timm Mlp's dropouts and norm: only exact when they are identities."""
        m = self.mlp
        return m.drop1.p == 0 and m.drop2.p == 0 and isinstance(m.norm, nn.Identity)

    def use_fused(self) -> bool:
        return self.fused and self.fusable

    def prepare(self, guidance: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Normalised guidance (B, H, W, G) or None -> the `forward` context: fused, the
        (B, nW, N, 2C) q / k terms in window order; plain, the guidance itself."""
        if guidance is None or not self.use_fused():
            return guidance
        windows = guidance.flatten(1, 2)[:, self.order].unflatten(1, (self.num_windows, -1))
        return self.attn.guidance_terms(windows)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (N, H, W, C) class slices (image-major); context: `prepare` output. Returns (N, H, W, C)."""
        if self.use_fused():
            return self.forward_fused(x, context)
        return self.forward_plain(x, context)

    def forward_fused(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        """Gather into window order, `window_step`, scatter back."""
        windows = permute_rows(x.flatten(1, 2), self.order, self.order_inverse).unflatten(1, (self.num_windows, -1))
        y = self.window_step(windows, context).flatten(1, 2)
        return permute_rows(y, self.order_inverse, self.order).view_as(x)

    def window_step(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        """The fused block on windows. x: (B * t, nW, N, C) class slices in window order
        (image-major); context: the (B, nW, N, 2C) q / k terms or None. Returns (B * t, nW, N, C)."""
        x = residual(x, self.attn.forward_fused(x, context, self.attn_mask, norm=self.norm1))
        if use_lean(x):
            return residual(x, norm_mlp(x, self.norm2, self.mlp.fc1, self.mlp.fc2))
        return residual(x, mlp(self.mlp.fc1, self.mlp.fc2, self.norm2(x), F.gelu, torch.ops.aten.gelu_))

    def forward_plain(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        """The official block. context: (B, H, W, G) normalised guidance (repeated here to x's
        slices) or None."""
        n, h, w, c = x.shape
        ws, shift = self.window_size, self.shift_size
        guidance = None if context is None else context.repeat_interleave(n // context.shape[0], dim=0)
        shortcut = x
        x = self.norm1(x)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            guidance = torch.roll(guidance, shifts=(-shift, -shift), dims=(1, 2)) if guidance is not None else None
        windows = self.attn.forward_plain(window_partition(x, ws),
                                          window_partition(guidance, ws) if guidance is not None else None,
                                          self.attn_mask)
        x = windows.view(n, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SwinTransformerBlockWrapper(nn.Module):
    """Spatial aggregation: a window block then a shifted-window block, per class slice.

    Fused path: the map is gathered into the first block's window order, from there into the
    second's, and back to row-major (three copies per wrapper, where two `forward_fused` blocks
    would make four), and the guidance LayerNorm and the guidance part of q / k are computed
    once per image (`prepare`).
    """

    def __init__(self, dim: int, guidance_dim: int, resolution: Tuple[int, int], nheads: int, window_size: int):
        super().__init__()
        self.block_1 = SwinTransformerBlock(dim, guidance_dim, resolution, nheads, window_size, 0)
        self.block_2 = SwinTransformerBlock(dim, guidance_dim, resolution, nheads, window_size, window_size // 2)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None
        first, second = self.block_1.order, self.block_2.order
        # window orders and their inverses (the backward pass of each gather)
        for name, order in [("map_to_first", first), ("first_to_second", torch.argsort(first)[second]),
                            ("second_to_map", torch.argsort(second))]:
            self.register_buffer(name, order, persistent=False)
            self.register_buffer(f"{name}_inverse", torch.argsort(order), persistent=False)
        self.fused = True

    def use_fused(self) -> bool:
        return self.fused and self.block_1.use_fused() and self.block_2.use_fused()

    def prepare(self, guidance: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Class-independent work: (B, G, H, W) projected guidance or None -> the `forward`
        context, each block's `prepare` of the normalised (B, H, W, G) guidance."""
        if guidance is None:
            return [None, None]
        guidance = self.guidance_norm(guidance.permute(0, 2, 3, 1))
        return [self.block_1.prepare(guidance), self.block_2.prepare(guidance)]

    def forward(self, x: torch.Tensor, context: List[Optional[torch.Tensor]]) -> torch.Tensor:
        """x: (B * t, H, W, C) class slices (image-major); context: `prepare` output.
        Returns (B * t, H, W, C)."""
        if self.use_fused():
            return self.forward_fused(x, context)
        return self.forward_plain(x, context)

    def forward_plain(self, x: torch.Tensor, context: List[Optional[torch.Tensor]]) -> torch.Tensor:
        return self.block_2.forward_plain(self.block_1.forward_plain(x, context[0]), context[1])

    def forward_fused(self, x: torch.Tensor, context: List[Optional[torch.Tensor]]) -> torch.Tensor:
        def reorder(t: torch.Tensor, name: str) -> torch.Tensor:  # (n, H * W, C) in a new order
            return permute_rows(t, getattr(self, name), getattr(self, f"{name}_inverse"))
        windows = lambda t: t.unflatten(1, (self.block_1.num_windows, -1))  # noqa: E731
        y = self.block_1.window_step(windows(reorder(x.flatten(1, 2), "map_to_first")), context[0])
        y = self.block_2.window_step(windows(reorder(y.flatten(1, 2), "first_to_second")), context[1])
        return reorder(y.flatten(1, 2), "second_to_map").view_as(x)


class ClassTransformerLayer(nn.Module):
    """Class aggregation: attention across the T classes at each (pooled) position.

    With `pad_length` > 0 (CVPR'24) every sequence shorter than it is extended, after the
    pooling, by copies of the learned `padding_tokens` with the learned `padding_guidance`;
    they are normalised, attended to and transformed like classes, and dropped before the
    upsampling back.
    """

    def __init__(self, hidden_dim: int, guidance_dim: int, nheads: int, attention_type: str,
                 pooling_size: Sequence[int], test_pooling_size: Sequence[int] = (), pad_length: int = 0):
        super().__init__()
        self.pool = nn.AvgPool2d(tuple(pooling_size))
        # inference may pool differently (official evaluation protocol: no pooling)
        self.test_pool = nn.AvgPool2d(tuple(test_pooling_size or pooling_size))
        self.pad_length = pad_length
        if pad_length:
            self.padding_tokens = nn.Parameter(torch.zeros(1, 1, hidden_dim))
            self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim))
        self.attention = AttentionLayer(hidden_dim, guidance_dim, nheads=nheads, attention_type=attention_type)
        self.MLP = nn.Sequential(nn.Linear(hidden_dim, 4 * hidden_dim), nn.ReLU(),
                                 nn.Linear(4 * hidden_dim, hidden_dim))
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.fused = True

    def num_padding(self, classes: int) -> int:
        return max(0, self.pad_length - classes)

    def use_fused(self, classes: int) -> bool:
        """The fused path handles padding through linear attention's rank-1 term only."""
        return self.fused and (self.num_padding(classes) == 0 or self.attention.attention_type == "linear")

    def transform(self, x: torch.Tensor, qk_bias: torch.Tensor,
                  extra: Optional[ExtraTokens]) -> torch.Tensor:
        """Fused pre-norm attention + MLP, both residual. x: (B, M, T, C); qk_bias: (B, 1, T, 2C) or (2C,)."""
        fc1, _, fc2 = self.MLP
        x = x + self.attention.forward_fused(self.norm1(x), qk_bias, extra)
        if use_lean(x):
            return residual(x, norm_mlp(x, self.norm2, fc1, fc2, activation="relu"))
        return residual(x, mlp(fc1, fc2, self.norm2(x), F.relu, torch.relu_))

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor], chunk: int = 0) -> torch.Tensor:
        """x: (B, T, H, W, C); guidance: (B, T, G) projected text guidance or None; chunk:
        positions per chunk of the fused path (0: all). Returns (B, T, H, W, C); fused without
        autograd, written into x.

        The pooled branch keeps its own residual and is then added to x again (official).
        """
        if self.use_fused(x.shape[1]):
            return self.forward_fused(x, guidance, chunk)
        return self.forward_plain(x, guidance, chunk)

    def forward_fused(self, x: torch.Tensor, guidance: Optional[torch.Tensor], chunk: int = 0) -> torch.Tensor:
        b, t, h, w, c = x.shape
        in_place = not torch.is_grad_enabled()
        # the guidance half of q / k, once per class, broadcast over positions
        qk_bias = self.attention.qk_bias(guidance.unsqueeze(1) if guidance is not None else None)
        n_pad = self.num_padding(t)
        extra = None
        if n_pad:
            pad_guidance = self.padding_guidance[0, 0] if guidance is not None else None
            extra = self.attention.extra_tokens(n_pad, self.norm1(self.padding_tokens[0, 0]), pad_guidance)
        pool = self.pool if self.training else self.test_pool
        if tuple(pool.kernel_size) == (1, 1):  # pooling and resizing back are identities
            flat = x.view(b, t, h * w, c)

            def step(s: slice) -> torch.Tensor:
                chunk_x = flat[:, :, s].transpose(1, 2)
                return residual(chunk_x, self.transform(chunk_x, qk_bias, extra)).transpose(1, 2)
            return over_chunks(step, h * w, chunk or h * w, dim=2, out=flat if in_place else None).view_as(x)
        pooled = pool(x.view(b * t, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        ph, pw = pooled.shape[1:3]
        pooled = pooled.reshape(b, t, ph * pw, c)
        pooled = over_chunks(lambda s: self.transform(pooled[:, :, s].transpose(1, 2), qk_bias, extra).transpose(1, 2),
                             ph * pw, chunk or ph * pw, dim=2)
        pooled = pooled.reshape(b * t, ph, pw, c).permute(0, 3, 1, 2)
        up = F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
        up = up.reshape(b, t, h, w, c)
        return x.add_(up) if in_place else x + up

    def forward_plain(self, x: torch.Tensor, guidance: Optional[torch.Tensor], chunk: int = 0) -> torch.Tensor:
        """Plain path: pool, one sequence of classes (plus padding) per pooled position, attention
        and MLP residuals, upsample back, add. Shapes as `forward`; all positions at once (`chunk`
        sizes the fused path only)."""
        b, t, h, w, c = x.shape
        pool = self.pool if self.training else self.test_pool
        pooled = pool(x.permute(0, 1, 4, 2, 3).reshape(b * t, c, h, w))  # (B * T, C, ph, pw)
        ph, pw = pooled.shape[-2:]
        seq = pooled.view(b, t, c, ph * pw).permute(0, 3, 1, 2).reshape(b * ph * pw, t, c)  # (B * M, T, C)
        if guidance is not None:
            guidance = guidance.repeat_interleave(ph * pw, dim=0)  # (B * M, T, G)
        n_pad = self.num_padding(t)
        if n_pad:
            seq = torch.cat([seq, self.padding_tokens.expand(seq.shape[0], n_pad, -1)], dim=1)
            if guidance is not None:
                guidance = torch.cat([guidance, self.padding_guidance.expand(seq.shape[0], n_pad, -1)], dim=1)
        seq = seq + self.attention.forward_plain(self.norm1(seq), guidance)
        seq = seq + self.MLP(self.norm2(seq))
        length = seq.shape[1]
        maps = seq.view(b, ph * pw, length, c).permute(0, 2, 3, 1).reshape(b * length, c, ph, pw)
        up = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=True)
        up = up.view(b, length, c, h, w)[:, :t].permute(0, 1, 3, 4, 2)
        return x + up


class AggregatorLayer(nn.Module):
    """One spatial aggregation followed by one class aggregation."""

    def __init__(self, hidden_dim: int, text_guidance_dim: int, appearance_guidance_dim: int, nheads: int,
                 resolution: Tuple[int, int], pooling_size: Sequence[int], window_size: int, attention_type: str,
                 test_pooling_size: Sequence[int] = (), pad_length: int = 0):
        super().__init__()
        self.swin_block = SwinTransformerBlockWrapper(hidden_dim, appearance_guidance_dim, resolution, nheads,
                                                      window_size)
        self.attention = ClassTransformerLayer(hidden_dim, text_guidance_dim, nheads, attention_type, pooling_size,
                                               test_pooling_size, pad_length)

    def forward(self, x: torch.Tensor, appearance: Optional[torch.Tensor], text: Optional[torch.Tensor],
                class_chunk: int = 0, position_chunk: int = 0, checkpoint: bool = False) -> torch.Tensor:
        """x: (B, T, H, W, C); appearance: (B, G, H, W) projected guidance or None; text: (B, T, G_t)
        projected text guidance or None; class_chunk: classes per spatial chunk (0: all);
        position_chunk: positions per class-attention chunk (0: all); checkpoint: with autograd,
        each spatial chunk and the class attention are recomputed in the backward pass instead
        of storing their activations. Returns (B, T, H, W, C); without autograd, written into x."""
        b, t = x.shape[:2]
        context = self.swin_block.prepare(appearance)
        spatial = lambda xs: self.swin_block(xs.flatten(0, 1), context).unflatten(0, (b, -1))  # noqa: E731
        if not torch.is_grad_enabled():
            x = over_chunks(lambda s: spatial(x[:, s]), t, class_chunk or t, out=x)
            return self.attention(x, text, position_chunk)
        x = over_class_chunks(spatial, x, class_chunk or t, checkpoint)
        attention = checkpointed(self.attention) if checkpoint else self.attention
        return attention(x, text, position_chunk)


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

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.double_conv[0]

    def after_first_conv(self, y: torch.Tensor) -> torch.Tensor:
        """Everything after the first convolution. y: (N, C_out, h, w) -> (N, C_out, h, w)."""
        for layer in self.double_conv[1:]:
            y = layer(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, h, w) -> (N, C_out, h, w)."""
        return self.double_conv(x)




class Up(nn.Module):
    """x2 transposed-conv upsampling, concatenation of projected guidance, DoubleConv.

    Fused path, without building either the upsampled map or the concatenation:
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
        self.fused = True

    def fused_weight(self) -> torch.Tensor:
        """(4 * C_out, C_in, 2, 2): transposed conv then first convolution, phase-major (a, b)."""
        first = self.conv.first_conv.weight[:, : self.up.out_channels]  # (C_out, C_up, 3, 3)
        s = phase_selection(first.device).to(first.dtype)
        w = torch.einsum("aykm,bxln,pokl,comn->abpcyx", s, s, first, self.up.weight)
        return w.flatten(0, 2)

    def guidance_term(self, guidance: Optional[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """(B, G, 2h, 2w) projected guidance or None; size (2h, 2w) -> (B or 1, C_out, 2h, 2w)."""
        first = self.conv.first_conv.weight
        bias = self.up.bias.view(1, -1, 1, 1).expand(1, -1, *size)
        term = F.conv2d(bias, first[:, : self.up.out_channels], padding=1)
        if guidance is not None:
            term = term + F.conv2d(guidance, first[:, self.up.out_channels:], padding=1)
        return term.contiguous(memory_format=torch.channels_last)

    def prepare(self, guidance: Optional[torch.Tensor], size: Tuple[int, int]):
        """Class-independent work -> the `forward` context: fused, (guidance term, fused
        weight); plain, the guidance itself."""
        return (self.guidance_term(guidance, size), self.fused_weight()) if self.fused else guidance

    def forward(self, x, context):
        """x: (B * t, C_in, h, w) image-major, or its `PreActivation` (lean training path);
        context: `prepare` output. Returns (B * t, C_out, 2h, 2w); on the lean training path a
        `PreActivation` whose GroupNorm and ReLU the next convolution applies (recomputed in
        the backward pass instead of stored)."""
        if self.fused:
            return self.forward_fused(x, context)
        return self.forward_plain(x, context)

    def forward_plain(self, x, context):
        """Transposed convolution, concatenation of the guidance (context), DoubleConv."""
        y = self.up(x.materialize() if isinstance(x, PreActivation) else x)
        if context is not None:
            y = torch.cat([y, context.repeat_interleave(y.shape[0] // context.shape[0], dim=0)], dim=1)
        return self.conv(y)

    def forward_fused(self, x, context):
        """Four phase convolutions interleaved, plus the class-independent guidance term."""
        term, weight = context
        phases = conv_after(x, weight, None, padding=1)  # (n, 4 * C_out, h + 1, w + 1), phase-major
        y = interleave_phases(phases.permute(0, 2, 3, 1).unflatten(-1, (2, 2, -1)), term)  # channels-last
        if not use_lean(y):
            return self.conv.after_first_conv(y)
        _, norm1, _, conv2, norm2, _ = self.conv.double_conv
        return PreActivation(conv_after(PreActivation(y, norm1), conv2.weight, conv2.bias, padding=1), norm2)


UNSELECTED_LOGIT = -100.0  # the logit of every class a view does not keep (CLASS_PAD_LENGTH)


def select_classes(img_feats: torch.Tensor, text_feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Indices (B, k), ascending, of each image's k classes of highest cost: the maximum over
    templates and positions of the cosine of L2-normalised image features (B, C, H, W) and
    text features (B, T, P, C). Classes are scored `chunk` at a time."""
    img = F.normalize(img_feats, dim=1)

    def score(s: slice) -> torch.Tensor:
        return torch.einsum("bchw,btpc->btphw", img, F.normalize(text_feats[:, s], dim=-1)).flatten(2).amax(-1)
    scores = over_chunks(score, text_feats.shape[1], chunk)
    return scores.topk(k, dim=1).indices.sort(dim=1).values


class Aggregator(nn.Module):
    """Cost volume -> aggregation layers -> decoder. See `forward` for shapes.

    `pad_length` > 0 (CVPR'24): the class attention pads shorter class lists to it, and with
    more classes than that each image keeps only its `pad_length` best-scoring classes (see
    `select_classes`); the others get logits of exactly `UNSELECTED_LOGIT`.
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
        pad_length: int = 0,
        budget: Optional[ChunkBudget] = None,
        checkpoint: bool = False,
    ):
        super().__init__()
        self.pad_length = pad_length
        self.checkpoint = checkpoint
        self.budget = budget or ChunkBudget()
        self.layers = nn.ModuleList([
            AggregatorLayer(hidden_dim, text_guidance_proj_dim, appearance_guidance_proj_dim, nheads,
                            tuple(feature_resolution), pooling_size, window_size, attention_type, test_pooling_size,
                            pad_length)
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
        self.fused = True

    def slice_bytes(self, h: int, w: int) -> int:
        """Estimated peak activation bytes of one class of one view in the spatial blocks or the
        decoder, whichever is larger."""
        hidden = self.conv1.out_channels
        decoder = [self.decoder1.conv.first_conv.out_channels, self.decoder2.conv.first_conv.out_channels]
        return max(spatial_bytes_per_class(h, w, self.conv1.in_channels, hidden),
                   decoder_bytes_per_class(h, w, hidden, decoder))

    def chunk_sizes(self, views: int, classes: int, h: int, w: int,
                    device: torch.device = torch.device("cpu")) -> Tuple[int, int]:
        """(classes per chunk, positions per chunk of the class attention) for this input: all
        of them on the plain path, else within the budget; in training, classes within the
        budget and all positions. (Training chunks store as much as one pass, but the backward
        pass runs chunk by chunk, so its temporaries are one chunk's; with `checkpoint` the
        chunks are also recomputed one at a time.)"""
        if not self.fused:
            return classes, h * w
        if torch.is_grad_enabled():  # MEMORY_BUDGET_MB alone: CPU_CHUNK_MB sizes inference's cache-sized chunks
            training = ChunkBudget(self.budget.memory_mb, 0, self.budget.class_chunk)
            return training.classes(classes, views * self.slice_bytes(h, w), device), h * w
        per_class = self.budget.classes(classes, views * self.slice_bytes(h, w), device)
        per_position = self.budget.items(h * w, class_attention_bytes_per_position(views, classes,
                                                                                    self.conv1.out_channels), device)
        return per_class, per_position

    def head_logits(self, y) -> torch.Tensor:
        """The 3x3 logit head: (N, C, 4H, 4W), or the lean training path's `PreActivation` of it,
        -> (N, 1, 4H, 4W). Fused without autograd, one product over the channels and nine shifted
        sums (`conv_by_taps`, 2.4x faster than the direct convolution to one channel)."""
        if not torch.is_tensor(y):
            return conv_after(y, self.head.weight, self.head.bias, padding=1)
        if self.fused and not torch.is_grad_enabled():
            return conv_by_taps(y, self.head.weight, self.head.bias)
        return self.head(y)

    def embed(self, img_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Cosine cost volume through conv1, the P templates as channels.

        img_feats (B, C, H, W) L2-normalised; text_feats (B, t, P, C). Returns (B, t, H, W, hidden).
        """
        corr = torch.einsum("bchw,btpc->bthwp", img_feats, F.normalize(text_feats, dim=-1))
        x = self.conv1(corr.flatten(0, 1).permute(0, 3, 1, 2))  # channels-last in, channels-last out
        return x.permute(0, 2, 3, 1).unflatten(0, corr.shape[:2])

    def forward(self, img_feats: torch.Tensor, text_feats: torch.Tensor, guidance: Sequence[torch.Tensor]):
        """
        Args:
            img_feats: (B, C, H, W) dense CLIP features.
            text_feats: (B, T, P, C) text embeddings.
            guidance: deepest first: (B, G0, H, W) appearance, (B, G1, 2H, 2W) and (B, G2, 4H, 4W)
                decoder guidance.
        Returns:
            (B, T, 4H, 4W) logits.
        """
        b, t = text_feats.shape[:2]
        if not self.pad_length or t <= self.pad_length:
            return self.aggregate(img_feats, text_feats, guidance)
        h, w = img_feats.shape[-2:]
        prompts, channels = text_feats.shape[2:]
        per_chunk = self.budget.items(t, selection_bytes_per_class(b, prompts, h, w, channels), img_feats.device)
        keep = select_classes(img_feats, text_feats, self.pad_length, per_chunk)  # (B, pad_length)
        selected = text_feats.gather(1, keep[:, :, None, None].expand(-1, -1, *text_feats.shape[2:]))
        logits = self.aggregate(img_feats, selected, guidance)
        out = logits.new_full((b, t, *logits.shape[2:]), UNSELECTED_LOGIT)
        return out.scatter_(1, keep[:, :, None, None].expand_as(logits), logits)

    def aggregate(self, img_feats: torch.Tensor, text_feats: torch.Tensor, guidance: Sequence[torch.Tensor]):
        """`forward` for every given class."""
        b, t = text_feats.shape[:2]
        h, w = img_feats.shape[-2:]
        img_feats = F.normalize(img_feats, dim=1)
        appearance, text_guidance, decoder_guidance = None, None, [None, None]
        if self.guidance_projection is not None:
            appearance = self.guidance_projection(guidance[0])
        if self.decoder_guidance_projection is not None:
            decoder_guidance = [proj(g) for proj, g in zip(self.decoder_guidance_projection, guidance[1:])]
        if self.text_guidance_projection is not None:
            text_guidance = self.text_guidance_projection(F.normalize(text_feats.mean(dim=-2), dim=-1))
        per_class, per_position = self.chunk_sizes(b, t, h, w, img_feats.device)

        embedding_bytes = b * embedding_bytes_per_class(h, w, self.conv1.in_channels, self.conv1.out_channels)
        per_embedding = self.budget.items(t, embedding_bytes, img_feats.device)
        x = over_chunks(lambda s: self.embed(img_feats, text_feats[:, s]), t, per_embedding)
        for layer in self.layers:
            x = layer(x, appearance, text_guidance, per_class, per_position, self.checkpoint)

        contexts = [self.decoder1.prepare(decoder_guidance[0], (2 * h, 2 * w)),
                    self.decoder2.prepare(decoder_guidance[1], (4 * h, 4 * w))]

        def decode(xs: torch.Tensor) -> torch.Tensor:  # (B, t', H, W, C) -> (B, t', 4H, 4W)
            y = xs.flatten(0, 1).permute(0, 3, 1, 2)
            y = self.decoder2(self.decoder1(y, contexts[0]), contexts[1])
            return self.head_logits(y).unflatten(0, (b, -1)).squeeze(2)
        if torch.is_grad_enabled():
            return over_class_chunks(decode, x, per_class, self.checkpoint)
        return over_chunks(lambda s: decode(x[:, s]), t, per_class)
