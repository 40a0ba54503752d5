"""D2SwinTransformer: detectron2's Swin Transformer with CAT-Seg's config keys and output names.

detectron2's implementation has the official key layout (patch_embed, layers, norm{i}) and the
same computation, so it is used as is; this class reads MODEL.SWIN.*, names the outputs
res2..res5 (strides 4..32) instead of p0..p3, and computes the window attention with the fused
`scaled_dot_product_attention` (`FusedWindowAttention`: same parameters, same result).
"""
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.swin import SwinTransformer, WindowAttention

from ..attention import per_window_attention


class FusedWindowAttention(WindowAttention):
    """detectron2's WindowAttention with a fast path: `forward` dispatches on `fused` to
    `forward_fused`, computed by `scaled_dot_product_attention` with the relative position bias
    (and the shifted-window mask) as its additive mask, or to `forward_plain`, detectron2's own."""

    fused = True  # a class attribute: instances are detectron2's, re-classed (D2SwinTransformer)

    def forward(self, x: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        """x: (nW * B, N, C) windows; mask: (nW, N, N) additive (0 / -100) or None. Returns (nW * B, N, C)."""
        if self.fused:
            return self.forward_fused(x, mask)
        return self.forward_plain(x, mask)

    def forward_plain(self, x: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        return super().forward(x, mask)

    def forward_fused(self, x: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        windows, n, c = x.shape
        qkv = self.qkv(x).view(windows, n, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (nW * B, heads, N, d)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).to(q.dtype)  # (heads, N, N)
        dropout = self.attn_drop.p if self.training else 0.0
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, bias.unsqueeze(0), dropout_p=dropout, scale=self.scale)
        else:
            nw = mask.shape[0]
            q, k, v = (t.unflatten(0, (-1, nw)) for t in (q, k, v))
            masks = bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)  # (nW, heads, N, N)
            out = per_window_attention(q, k, v, masks, scale=self.scale, dropout_p=dropout).flatten(0, 1)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(windows, n, c)))


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(SwinTransformer):
    """Swin backbone; outputs the stages named in MODEL.SWIN.OUT_FEATURES ("res2".. "res5").

    The output norm of the first stage (`norm0`) is frozen, as in the official model.
    """

    def __init__(self, cfg, input_shape: ShapeSpec):
        swin = cfg.MODEL.SWIN
        out_features = list(swin.OUT_FEATURES)
        super().__init__(
            pretrain_img_size=swin.PRETRAIN_IMG_SIZE,
            patch_size=swin.PATCH_SIZE,
            in_chans=input_shape.channels,
            embed_dim=swin.EMBED_DIM,
            depths=swin.DEPTHS,
            num_heads=swin.NUM_HEADS,
            window_size=swin.WINDOW_SIZE,
            mlp_ratio=swin.MLP_RATIO,
            qkv_bias=swin.QKV_BIAS,
            qk_scale=swin.QK_SCALE,
            drop_rate=swin.DROP_RATE,
            attn_drop_rate=swin.ATTN_DROP_RATE,
            drop_path_rate=swin.DROP_PATH_RATE,
            ape=swin.APE,
            patch_norm=swin.PATCH_NORM,
            out_indices=tuple(int(name[3:]) - 2 for name in out_features),
            use_checkpoint=swin.USE_CHECKPOINT,
        )
        self._out_features = out_features
        self._out_feature_channels = {f"res{i + 2}": self.num_features[i] for i in self.out_indices}
        self._out_feature_strides = {f"res{i + 2}": 2 ** (i + 2) for i in self.out_indices}
        if hasattr(self, "norm0"):
            self.norm0.requires_grad_(False)
        for module in self.modules():
            if type(module) is WindowAttention:
                module.__class__ = FusedWindowAttention

    def forward(self, x):
        """x: (N, 3, H, W) -> {"res2": (N, C, H/4, W/4), ...} for the configured stages."""
        return {f"res{int(k[1:]) + 2}": v for k, v in super().forward(x).items()}

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }
