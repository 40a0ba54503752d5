"""The Cluster backbone: a clustering-based vision network (seed 000), as a detectron2 backbone.

An image is a set of points: each pixel's RGB plus its two normalised coordinates. A
PointReducer (strided conv) embeds 4x4 patches of these points; four stages of ClusterBlocks
follow, separated by PointReducers (3x3 conv, stride 2), so the stages have strides 4, 8, 16,
32 (res2..res5). With ``fork_feat`` every stage's output goes through its own GroupNorm(1, C)
(``norm0``, ``norm2``, ``norm4``, ``norm6``: indices of the stages in ``network``).

ClusterBlock (pre-norm residual, like a MetaFormer block):
    x = x + drop_path(layer_scale_1 * Clustering(GroupNorm1(x)))
    x = x + drop_path(layer_scale_2 * Mlp(GroupNorm1(x)))     Mlp: 1x1 conv, GELU, 1x1 conv

Clustering token mixer, for a (B, C, H, W) map, with e heads of d channels, regions of
wh x ww points (N points) and ch x cw centres per region (M centres):
 1. projections (1x1 convs): ``conv1`` -> points x, ``conv_v`` -> value, ``conv_f`` -> feature,
    each (B, e*d, H, W).
 2. regions: the maps are zero-padded to multiples of the region side and cut into regions;
    every (region, head) pair clusters on its own. A region side larger than the map is
    clamped to the map's side.
 3. centre proposal: average pooling of x to ch x cw per region (padded points excluded;
    a pooling cell holding only padding proposes a zero centre, whose cosine similarity is 0
    with every point); the value centres are pooled likewise from value.
 4. refinement (seed): ``num_clustering`` rounds of centres = attention(q=centres, k=value,
    v=feature), softmax(QK^T / sqrt(d))V over the region's points in (B, L, heads, d) layout —
    ``flash_attn.flash_attn_func`` when flash-attn is importable and the tensors are CUDA
    fp16/bf16, else ``torch.nn.functional.scaled_dot_product_attention`` (same semantics).
    Padded points take part here as zero keys/values (flash-attn has no padding mask).
 5. assignment: s = sigmoid(beta + alpha * cos(centre, point)) (learnable scalars alpha=1,
    beta=0 at init); each point keeps s only for its most similar centre (hard assignment,
    the gradient flows through s); padded points get s = 0.
 6. aggregation (as Context Cluster): centre_m = (value centre_m + sum_n s_mn value_n) /
    (1 + sum_n s_mn).
 7. dispatch: point_n = sum_m s_mn centre_m; regions and heads are merged, the padding is
    cropped away and ``conv2`` (1x1) projects e*d -> C.

Any input size: ``D2ClusterBackbone`` pads the image to a multiple of 32 (coordinates keep
their un-padded normalisation: pixel i of an image of width W has x = i / (W - 1) - 0.5,
padded pixels continue the ramp), runs the network and crops each output to
ceil(input / stride); regions pad themselves as in step 2.

Variants (after Context Cluster's CoC-Tiny / CoC-Small, ICLR 2023; region side 12 points at
every stage, i.e. 8x8, 4x4, 2x2, 1x1 regions for a 384x384 input — the analogue of CoC's
7-point regions at 224; 2x2 centres per region and head; 3 refinement rounds as in the seed):

    variant         depths        embed_dims          mlp_ratios  heads      head_dims
    cluster_tiny    3, 4, 5, 2    32, 64, 196, 320    8, 8, 4, 4  4, 4, 8, 8 24, 24, 24, 24
    cluster_small   2, 2, 6, 2    64, 128, 320, 512   8, 8, 4, 4  4, 4, 8, 8 32, 32, 32, 32

Layer scale starts at 1e-5; stochastic depth grows linearly over all blocks. The native key
layout (module names below) is recorded in ``manifests/<variant>.tsv``. Stages deeper than the
deepest requested output are not built (none of their parameters would get a gradient); with
``num_clustering`` 0 there is no ``conv_f``.
"""
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY
from einops import rearrange
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ...padding import pad_to_multiple
from ...weights.backbone import load_backbone_checkpoint
from .padded import PaddedBackbone, crop_to_input

try:
    from flash_attn import flash_attn_func
except ImportError:  # flash-attn is optional (CUDA only): the PyTorch path is exact
    flash_attn_func = None

_NAMES = ("res2", "res3", "res4", "res5")


# ---------------------------------------------------------------------------- attention
def use_flash(*tensors: torch.Tensor) -> bool:
    """True when flash-attn is importable and every tensor is CUDA fp16/bf16."""
    return flash_attn_func is not None and all(
        t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) for t in tensors
    )


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with flash_attn_func's layout: q (B, Lq, h, d), k/v (B, Lk, h, d)
    -> (B, Lq, h, d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, Lq, h, d), (B, Lk, h, d), (B, Lk, h, d) -> (B, Lq, h, d): flash-attn where it applies."""
    if use_flash(q, k, v):
        return flash_attn_func(q, k, v)
    return attention_torch(q, k, v)


# ---------------------------------------------------------------------------- small modules
class PointReducer(nn.Module):
    """Strided conv embedding of point patches: (B, in, H, W) -> (B, out, H', W')."""

    def __init__(self, patch_size: int, stride: int, padding: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with one group: normalises each sample over (C, H, W)."""

    def __init__(self, num_channels: int):
        super().__init__(1, num_channels)


class Mlp(nn.Module):
    """1x1 conv MLP: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def pairwise_cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., M, d), (..., N, d) -> (..., M, N) cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-2, -1)


def masked_pool(x: torch.Tensor, valid: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling that ignores invalid points: (N, C, h, w), (N, 1, h, w) in {0, 1}
    -> (N, C, *size); a cell with no valid point is 0."""
    total = F.adaptive_avg_pool2d(x * valid, size)
    share = F.adaptive_avg_pool2d(valid, size)
    return total / share.clamp_min(1e-6)


# ---------------------------------------------------------------------------- clustering
class Clustering(nn.Module):
    """Windowed multi-head context clustering (module docstring, steps 1-7):
    (B, dim, H, W) -> (B, out_dim, H, W)."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        centers: Tuple[int, int] = (2, 2),
        window: Tuple[int, int] = (12, 12),
        heads: int = 4,
        head_dim: int = 24,
        num_clustering: int = 1,
    ):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.centers, self.window = tuple(centers), tuple(window)
        self.num_clustering = num_clustering
        inner = heads * head_dim
        self.conv1 = nn.Conv2d(dim, inner, 1)
        self.conv_v = nn.Conv2d(dim, inner, 1)
        self.conv_f = nn.Conv2d(dim, inner, 1) if num_clustering > 0 else None
        self.conv2 = nn.Conv2d(inner, out_dim, 1)
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))

    def to_regions(self, t: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
        """(B, e*d, H', W') -> (B*R*e, d, wh, ww), R regions of wh x ww."""
        return rearrange(t, "b (e d) (nh wh) (nw ww) -> (b nh nw e) d wh ww", e=self.heads, wh=wh, ww=ww)

    def to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B*R*e, L, d) -> (B*R, L, e, d), the layout of flash_attn_func."""
        return rearrange(t, "(br e) l d -> br l e d", e=self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        wh, ww = min(self.window[0], H), min(self.window[1], W)
        maps = [self.conv1(x), self.conv_v(x)] + ([self.conv_f(x)] if self.conv_f is not None else [])
        valid = x.new_ones(B, self.heads, H, W)
        pad = (0, (-W) % ww, 0, (-H) % wh)
        maps = [F.pad(m, pad) for m in maps]
        valid = F.pad(valid, pad)
        Hp, Wp = maps[0].shape[-2:]
        regions = [self.to_regions(m, wh, ww) for m in maps]  # (B*R*e, d, wh, ww) each
        valid = rearrange(valid, "b e (nh wh) (nw ww) -> (b nh nw e) 1 wh ww", wh=wh, ww=ww)

        points, value = regions[0], regions[1]
        centers = masked_pool(points, valid, self.centers).flatten(2).transpose(1, 2)  # (BRe, M, d)
        value_centers = masked_pool(value, valid, self.centers).flatten(2).transpose(1, 2)  # (BRe, M, d)
        points = points.flatten(2).transpose(1, 2)  # (BRe, N, d)
        value = value.flatten(2).transpose(1, 2)  # (BRe, N, d)
        if self.num_clustering > 0:
            # flash layout (B*R, L, e, d): the heads of one region form one attention call
            feature = self.to_heads(regions[2].flatten(2).transpose(1, 2))
            keys = self.to_heads(value)
            query = self.to_heads(centers)
            for _ in range(self.num_clustering):
                query = attention(query, keys, feature)
            centers = rearrange(query, "br l e d -> (br e) l d")

        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * pairwise_cos_sim(centers, points))  # (BRe, M, N)
        sim = sim * valid.flatten(2)
        best = F.one_hot(sim.argmax(dim=1), sim.shape[1]).transpose(1, 2).to(sim.dtype)  # (BRe, M, N)
        sim = sim * best
        clusters = (sim @ value + value_centers) / (sim.sum(dim=-1, keepdim=True) + 1.0)  # (BRe, M, d)
        out = sim.transpose(1, 2) @ clusters  # (BRe, N, d)
        out = rearrange(
            out, "(b nh nw e) (wh ww) d -> b (e d) (nh wh) (nw ww)",
            b=B, nh=Hp // wh, nw=Wp // ww, e=self.heads, wh=wh,
        )
        return self.conv2(out[..., :H, :W])


class ClusterBlock(nn.Module):
    """Pre-norm residual block: Clustering token mixer then 1x1-conv MLP, layer scale and
    stochastic depth on both branches. (B, dim, H, W) -> (B, dim, H, W)."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        drop_path: float,
        layer_scale_init_value: float,
        centers: Tuple[int, int],
        window: Tuple[int, int],
        heads: int,
        head_dim: int,
        num_clustering: int,
    ):
        super().__init__()
        self.norm1 = GroupNorm(dim)
        self.token_mixer = Clustering(dim, dim, centers, window, heads, head_dim, num_clustering)
        self.norm2 = GroupNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------- network
@dataclass(frozen=True)
class ClusterSpec:
    """Hyper-parameters of a Cluster network (one entry per stage for the sequences)."""

    depths: Sequence[int]
    embed_dims: Sequence[int]
    mlp_ratios: Sequence[float]
    heads: Sequence[int]
    head_dims: Sequence[int]
    window_sizes: Sequence[int] = (12, 12, 12, 12)
    centers: Tuple[int, int] = (2, 2)
    num_clustering: int = 3
    layer_scale_init_value: float = 1e-5
    drop_path_rate: float = 0.0


VARIANTS = {
    "cluster_tiny": ClusterSpec(
        depths=(3, 4, 5, 2), embed_dims=(32, 64, 196, 320), mlp_ratios=(8, 8, 4, 4),
        heads=(4, 4, 8, 8), head_dims=(24, 24, 24, 24),
    ),
    "cluster_small": ClusterSpec(
        depths=(2, 2, 6, 2), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4),
        heads=(4, 4, 8, 8), head_dims=(32, 32, 32, 32),
    ),
}


def point_coordinates(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, C, H', W') -> (B, 2, H', W') coordinates (x, y) = (j / (W - 1) - 0.5, i / (H - 1) - 0.5)
    for an image of (H, W) = size placed at the top-left of the H' x W' tensor."""
    h, w = size
    ys = torch.arange(x.shape[-2], device=x.device, dtype=x.dtype) / max(h - 1, 1) - 0.5
    xs = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype) / max(w - 1, 1) - 0.5
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)  # (2, H', W')
    return grid.expand(x.shape[0], -1, -1, -1)


class Cluster(nn.Module):
    """Cluster network with fork_feat outputs: (B, 3, H, W) -> list of (B, C_i, H / 2**(i+2), W / 2**(i+2))
    for the first ``num_stages`` stages (H, W multiples of 2**(num_stages+1))."""

    def __init__(self, spec: ClusterSpec, num_stages: int = 4):
        super().__init__()
        dims = spec.embed_dims
        self.patch_embed = PointReducer(4, 4, 0, 5, dims[0])
        total = sum(spec.depths)
        dpr = [spec.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        network = []
        for i in range(num_stages):
            first = sum(spec.depths[:i])
            network.append(nn.Sequential(*[
                ClusterBlock(
                    dims[i], spec.mlp_ratios[i], dpr[first + j], spec.layer_scale_init_value, spec.centers,
                    (spec.window_sizes[i],) * 2, spec.heads[i], spec.head_dims[i], spec.num_clustering,
                )
                for j in range(spec.depths[i])
            ]))
            if i < num_stages - 1:
                network.append(PointReducer(3, 2, 1, dims[i], dims[i + 1]))
        self.network = nn.ModuleList(network)
        self.out_indices = [2 * i for i in range(num_stages)]
        for i, idx in enumerate(self.out_indices):
            self.add_module(f"norm{idx}", GroupNorm(dims[i]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Conv2d):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, image_size: Optional[Tuple[int, int]] = None) -> List[torch.Tensor]:
        """``image_size``: (H, W) of the image inside a padded ``x`` (default: all of x)."""
        x = self.patch_embed(torch.cat([x, point_coordinates(x, image_size or x.shape[-2:])], dim=1))
        outs = []
        for idx, block in enumerate(self.network):
            x = block(x)
            if idx in self.out_indices:
                outs.append(getattr(self, f"norm{idx}")(x))
        return outs


def variant_spec(variant: str, **overrides) -> ClusterSpec:
    """The variant's spec with the given non-empty fields replaced."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown Cluster variant {variant!r}; known: {sorted(VARIANTS)}")
    return replace(VARIANTS[variant], **{k: v for k, v in overrides.items() if v not in ([], (), None)})


@BACKBONE_REGISTRY.register()
class D2ClusterBackbone(PaddedBackbone):
    """Cluster stages as {res2..res5: (B, C_i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2)))}."""

    @configurable
    def __init__(self, spec: ClusterSpec, out_features: List[str], weights: str = "", strict: bool = False):
        super().__init__()
        self._out_features = sorted(out_features, key=_NAMES.index)
        self._out_feature_strides = {k: 4 * 2 ** _NAMES.index(k) for k in out_features}
        self._out_feature_channels = {k: spec.embed_dims[_NAMES.index(k)] for k in out_features}
        self._stages = [_NAMES.index(k) for k in self._out_features]
        self.cluster = Cluster(spec, num_stages=max(self._stages) + 1)
        if weights:
            self.load_weights(weights, strict)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.CLUSTER
        spec = variant_spec(
            c.VARIANT,
            embed_dims=tuple(c.EMBED_DIMS), depths=tuple(c.DEPTHS), heads=tuple(c.HEADS),
            head_dims=tuple(c.HEAD_DIMS), window_sizes=tuple(c.WINDOW_SIZES),
            num_clustering=None if c.NUM_CLUSTERING < 0 else c.NUM_CLUSTERING,
            drop_path_rate=c.DROP_PATH_RATE,
        )
        return {"spec": spec, "out_features": c.OUT_FEATURES, "weights": c.WEIGHTS,
                "strict": cfg.MODEL.CHECKPOINT_STRICT}

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised images -> {name: (B, C, ceil(H / s), ceil(W / s))}."""
        outs = self.cluster(pad_to_multiple(x, self.size_divisibility), image_size=tuple(x.shape[-2:]))
        features = {k: outs[i] for k, i in zip(self._out_features, self._stages)}
        return crop_to_input(features, self._out_feature_strides, x.shape[-2:])

    def load_weights(self, path: str, strict: bool = False):
        """Load a native-layout checkpoint (``cluster.*`` or the bare ``Cluster`` keys); returns the report."""
        return load_backbone_checkpoint(self, path, prefixes=("cluster.",), strict=strict)
