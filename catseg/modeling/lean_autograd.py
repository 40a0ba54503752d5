"""Training operations with hand-written backward passes: the same gradients as the autograd
composition they replace (up to float rounding), from fewer saved tensors and without
zero-filled gradient buffers.

Autograd keeps every intermediate that some backward formula reads. For the aggregator's
per-class stages (B x T slices of every activation) that is most of a training step's memory,
and several of these intermediates are cheap to recompute from their neighbours:

- `norm_linear`: LayerNorm then a linear map; keeps the LayerNorm's input only, the normalised
  tensor is recomputed in the backward pass;
- `norm_mlp`: LayerNorm, Linear, GELU (or QuickGELU, ReLU), Linear (a transformer MLP with its
  pre-norm); keeps the input only (with `keep_hidden`, also the hidden pre-activation): the
  normalised input, the hidden layer and the activation are recomputed;
- `norm_relu_conv`: GroupNorm, ReLU, then a convolution (the decoder's links); keeps the
  GroupNorm input and statistics, the activation is recomputed for the convolution's weight
  gradient;
- `norm_qkv_attention`: LayerNorm, the packed q / k / v projection and windowed softmax
  attention (PyTorch's fused CPU kernel and its backward); keeps the input, the attention output
  and the log-sum-exp only: q, k and v are computed again in the backward pass;
- `permute_rows`: a permutation along dim 1 (window orders); its backward is the inverse
  permutation, not a scatter into zeros;
- `interleave_phases`: the decoder's four-phase interleave plus a per-image term; its backward
  reads the four phases back instead of summing four zero-filled slices;
- `upsampled_bce`: the training loss (bilinear upsampling of the logits to the label size, then
  binary cross-entropy against one-hot targets); keeps the low-resolution logits and the
  labels only: neither the upsampled logits nor the one-hot targets are stored.

Each takes the parameters as tensors, so the module keeps its official parameters and keys.
tests/test_lean_autograd.py compares every function and gradient with the plain composition.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from . import inplace

aten = torch.ops.aten


def use_lean(x: torch.Tensor) -> bool:
    """Lean functions apply when autograd records and no autocast is active (their backward
    passes run in the forward's dtype; under autocast the plain composition runs)."""
    return torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (N, C)."""
    return t.reshape(-1, t.shape[-1])


def _linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs):
    """Gradients of F.linear(x, weight, bias) w.r.t. (x, weight, bias), given `needs` flags."""
    g = _rows(grad)
    grad_x = (grad @ weight) if needs[0] else None
    grad_w = g.t() @ _rows(x) if needs[1] else None
    grad_b = g.sum(0) if needs[2] else None
    return grad_x, grad_w, grad_b


def _per_image(t: torch.Tensor, images: int, width: int) -> torch.Tensor:
    """(n, ..., C_out) -> its (images, n / images, ..., width) leading-column view."""
    return t.view(images, -1, *t.shape[1:])[..., :width]


def _norm_project(x, norm_weight, norm_bias, eps, weight, bias, image_term):
    """(F.linear(layer_norm(x), weight, bias) plus the per-image term, mean, rstd); the
    normalised x is not kept."""
    z, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    out = F.linear(z, weight, bias)
    if image_term is not None:
        _per_image(out, image_term.shape[0], image_term.shape[-1]).add_(image_term.unsqueeze(1))
    return out, mean, rstd


class _NormLinear(Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias, image_term):
        out, mean, rstd = _norm_project(x, norm_weight, norm_bias, eps, weight, bias, image_term)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.eps = eps
        ctx.term_shape = None if image_term is None else image_term.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        z = torch.native_layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, ctx.eps)[0]
        need_x, need_nw, need_nb, _, need_w, need_b, need_term = ctx.needs_input_grad
        grad_z, grad_w, grad_b = _linear_backward(grad, z, weight, (need_x or need_nw or need_nb, need_w, need_b))
        grad_x = grad_nw = grad_nb = grad_term = None
        if grad_z is not None:
            grad_x, grad_nw, grad_nb = aten.native_layer_norm_backward(
                grad_z, x, [x.shape[-1]], mean, rstd, norm_weight, norm_bias, [need_x, need_nw, need_nb])
        if need_term:
            grad_term = _per_image(grad.contiguous(), ctx.term_shape[0], ctx.term_shape[-1]).sum(1)
        return grad_x, grad_nw, grad_nb, None, grad_w, grad_b, grad_term


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm, weight: torch.Tensor, bias: Optional[torch.Tensor],
                image_term: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(norm(x), weight, bias), plus `image_term` on the leading columns of each image's
    rows. x: (n, ..., C) with n = B x t rows image-major -> (n, ..., C_out); image_term:
    (B, ..., D), D <= C_out, added to out[i * t: (i + 1) * t, ..., :D] for image i."""
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, weight, bias, image_term)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's QuickGELU, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def quick_gelu_backward_(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad * d/dx [x * sigmoid(1.702 x)] = grad * s * (1 + 1.702 x (1 - s)), s = sigmoid(1.702 x),
    written into x."""
    s = torch.sigmoid(1.702 * x)
    x.mul_(1.702)
    return x.addcmul_(x, s, value=-1).add_(1).mul_(s).mul_(grad)


def gelu_backward_(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad * GELU'(x) (exact GELU), written into x."""
    return aten.gelu_backward.grad_input(grad, x, grad_input=x)


def relu_backward_(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad where x > 0, else 0, written into x."""
    return aten.threshold_backward.grad_input(grad, x, 0, grad_input=x)


# MLP activations: (function, in-place function, backward(grad, input) written into the input)
ACTIVATIONS = {"gelu": (F.gelu, aten.gelu_, gelu_backward_),
               "quick_gelu": (quick_gelu, inplace.quick_gelu_, quick_gelu_backward_),
               "relu": (F.relu, torch.relu_, relu_backward_)}


class _NormMLP(Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w1, b1, w2, b2, keep_hidden, activation):
        z, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
        hidden = F.linear(z, w1, b1)
        act, act_, _ = ACTIVATIONS[activation]
        a = act(hidden) if keep_hidden else act_(hidden)
        # a base tensor, not a view of a (rows, C) product: callers may add a residual into it
        out = x.new_empty(*x.shape[:-1], w2.shape[0])
        if b2 is None:
            torch.mm(_rows(a), w2.t(), out=_rows(out))
        else:
            torch.addmm(b2, _rows(a), w2.t(), out=_rows(out))
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w1, b1, w2, hidden if keep_hidden else None)
        ctx.setup = (eps, activation)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, norm_weight, norm_bias, w1, b1, w2, hidden = ctx.saved_tensors
        eps, activation = ctx.setup
        act, _, act_backward_ = ACTIVATIONS[activation]
        need_x, need_nw, need_nb, _, need_w1, need_b1, need_w2, need_b2, _, _ = ctx.needs_input_grad
        z = torch.native_layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)[0]
        recomputed = hidden is None
        if recomputed:
            hidden = F.linear(z, w1, b1)
        # fresh buffers are reused (fresh large allocations are the slow part on CPU): the
        # activation's buffer takes the gradient w.r.t. it, a recomputed hidden layer its own
        a = act(hidden)
        g = _rows(grad)
        grad_w2 = g.t() @ _rows(a) if need_w2 else None
        grad_b2 = g.sum(0) if need_b2 else None
        grad_a = torch.mm(g, w2, out=a.view(-1, a.shape[-1])).view_as(a)
        grad_hidden = act_backward_(grad_a, hidden if recomputed else hidden.clone())
        del grad_a, a, hidden
        need_z = need_x or need_nw or need_nb
        grad_z, grad_w1, grad_b1 = _linear_backward(grad_hidden, z, w1, (need_z, need_w1, need_b1))
        grad_x = grad_nw = grad_nb = None
        if need_z:
            grad_x, grad_nw, grad_nb = aten.native_layer_norm_backward(
                grad_z, x, [x.shape[-1]], mean, rstd, norm_weight, norm_bias, [need_x, need_nw, need_nb])
        return grad_x, grad_nw, grad_nb, None, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def norm_mlp(x: torch.Tensor, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear, keep_hidden: bool = False,
             activation: str = "gelu") -> torch.Tensor:
    """fc2(act(fc1(norm(x)))), act one of `ACTIVATIONS` (exact GELU, QuickGELU, ReLU). x: (..., C) ->
    (..., C_out). Without `keep_hidden`, fc1 runs again in the backward pass instead of its
    output (4x wider than x in a transformer MLP) being stored."""
    return _NormMLP.apply(x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                          keep_hidden, activation)


class _NormReLUConv(Function):
    @staticmethod
    def forward(ctx, y, norm_weight, norm_bias, groups, eps, weight, bias, padding):
        n, c = y.shape[:2]
        a, mean, rstd = torch.native_group_norm(y, norm_weight, norm_bias, n, c, y.shape[2] * y.shape[3], groups, eps)
        ctx.save_for_backward(y, mean, rstd, norm_weight, norm_bias, weight)
        ctx.setup = (groups, eps, padding, bias is not None)
        return F.conv2d(a.relu_(), weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad):
        y, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        groups, eps, padding, has_bias = ctx.setup
        need_y, need_nw, need_nb, _, _, need_w, need_b, _ = ctx.needs_input_grad
        n, c = y.shape[:2]
        hw = y.shape[2] * y.shape[3]
        a = torch.native_group_norm(y, norm_weight, norm_bias, n, c, hw, groups, eps)[0].relu_()
        need_pre = need_y or need_nw or need_nb
        grad_a, grad_w, grad_b = aten.convolution_backward(
            grad, a, weight, [weight.shape[0]] if has_bias else None, [1, 1], [padding, padding], [1, 1], False,
            [0, 0], 1, [need_pre, need_w, need_b and has_bias])
        grad_y = grad_nw = grad_nb = None
        if need_pre:
            grad_pre = aten.threshold_backward.grad_input(grad_a, a, 0, grad_input=grad_a)
            del a
            grad_y, grad_nw, grad_nb = aten.native_group_norm_backward(
                grad_pre, y, mean, rstd, norm_weight, n, c, hw, groups, [need_y, need_nw, need_nb])
        return grad_y, grad_nw, grad_nb, None, None, grad_w, grad_b, None


class PreActivation(NamedTuple):
    """A decoder output whose GroupNorm and ReLU are still to apply: relu(norm(y)). Its consumer
    convolution applies them (`conv_after`), so they are recomputed instead of stored."""

    y: torch.Tensor
    norm: nn.GroupNorm

    def materialize(self) -> torch.Tensor:
        return F.relu(self.norm(self.y))


def norm_relu_conv(y: torch.Tensor, norm: nn.GroupNorm, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   padding: int) -> torch.Tensor:
    """F.conv2d(relu(norm(y)), weight, bias, padding=padding), stride 1. y: (N, C, H, W)."""
    return _NormReLUConv.apply(y, norm.weight, norm.bias, norm.num_groups, norm.eps, weight, bias, padding)


def conv_after(x, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """Stride-1 convolution of a tensor or of a `PreActivation` (GroupNorm + ReLU recomputed)."""
    if isinstance(x, PreActivation):
        return norm_relu_conv(x.y, x.norm, weight, bias, padding)
    return F.conv2d(x, weight, bias, padding=padding)


class _PermuteRows(Function):
    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(1, ctx.saved_tensors[0]), None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[:, order] for a permutation `order` of dim 1, whose inverse is `inverse`."""
    return _PermuteRows.apply(x, order, inverse)


def _interleave(phases: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, h + 1, w + 1, 2, 2, C) phases -> (n, h, 2, w, 2, C): element [i, a, j, b] is phase
    (a, b) at (i + a, j + b)."""
    n, c = phases.shape[0], phases.shape[-1]
    y = phases.new_empty(n, h, 2, w, 2, c)
    for a in range(2):
        for b in range(2):
            y[:, :, a, :, b] = phases[:, a: a + h, b: b + w, a, b]
    return y


class _InterleavePhases(Function):
    @staticmethod
    def forward(ctx, phases, term):
        n, hp, wp = phases.shape[:3]
        y = _interleave(phases, hp - 1, wp - 1).view(n, 2 * hp - 2, 2 * wp - 2, -1).permute(0, 3, 1, 2)
        if term is not None:
            y.view(term.shape[0], -1, *y.shape[1:]).add_(term.unsqueeze(1))
        ctx.shapes = (phases.shape, None if term is None else term.shape[0])
        return y

    @staticmethod
    def backward(ctx, grad):
        shape, images = ctx.shapes
        n, hp, wp = shape[:3]
        h, w = hp - 1, wp - 1
        g = grad.permute(0, 2, 3, 1).reshape(n, h, 2, w, 2, -1)
        grad_phases = grad.new_zeros(shape)
        for a in range(2):
            for b in range(2):
                grad_phases[:, a: a + h, b: b + w, a, b] = g[:, :, a, :, b]
        grad_term = None
        if ctx.needs_input_grad[1]:
            grad_term = grad.view(images, -1, *grad.shape[1:]).sum(1)
        return grad_phases, grad_term


def interleave_phases(phases: torch.Tensor, term: Optional[torch.Tensor]) -> torch.Tensor:
    """(n, h + 1, w + 1, 2, 2, C) phases -> (n, C, 2h, 2w) map (channels-last memory), plus
    `term` (B, C, 2h, 2w) added to each image's n / B slices (image-major), when given."""
    return _InterleavePhases.apply(phases, term)


class _UpsampledBCE(Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore):
        x = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        valid = targets != ignore
        label = targets.masked_fill(~valid, 0).long().unsqueeze(1)  # (B, 1, H, W)
        # every element as a negative, x - log sigmoid(x); a positive instead loses x
        total = (x - F.logsigmoid(x)).sum() - (x.gather(1, label).squeeze(1) * valid).sum()
        ctx.save_for_backward(logits, label, valid)
        ctx.numel = x.numel()
        return total / ctx.numel

    @staticmethod
    def backward(ctx, grad):
        logits, label, valid = ctx.saved_tensors
        x = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        grad_x = x.sigmoid_()  # d/dx = sigmoid(x) - onehot
        grad_x.scatter_(1, label, grad_x.gather(1, label) - valid.unsqueeze(1).to(grad_x.dtype))
        grad_x.mul_(grad / ctx.numel)
        grad_logits = aten.upsample_bilinear2d_backward(grad_x, list(label.shape[-2:]), list(logits.shape), False)
        return grad_logits, None, None


def upsampled_bce(logits: torch.Tensor, targets: torch.Tensor, ignore: int) -> torch.Tensor:
    """Mean binary cross-entropy of the logits (B, T, h, w), bilinearly upsampled to the labels'
    size, against one-hot targets from labels (B, H, W); ignored pixels are all-negative and
    still counted (the official loss, `meta_arch.bce_loss`)."""
    return _UpsampledBCE.apply(logits, targets, ignore)


FLASH_CPU = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_CPU_BACKWARD = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _heads(qkv: torch.Tensor, heads: int):
    """(n, nW, N, 3C) -> q, k, v, each (n, nW, heads, N, d) views."""
    return [t.unflatten(-1, (heads, -1)).transpose(-3, -2) for t in qkv.split(qkv.shape[-1] // 3, dim=-1)]


def _window_masks(masks: Optional[torch.Tensor], count: int, dtype):
    """Per window position, its (1, 1, N, N) additive mask, or None for all."""
    return [None] * count if masks is None else [m.view(1, 1, *m.shape[-2:]).to(dtype) for m in masks]


class _NormQKVAttention(Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias, image_term, heads, scale, masks):
        qkv, mean, rstd = _norm_project(x, norm_weight, norm_bias, eps, weight, bias, image_term)
        q, k, v = _heads(qkv, heads)
        n, nw = q.shape[:2]
        if masks is None:  # all windows in one call: (n * nW, heads, N, d)
            out, lse = FLASH_CPU(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), scale=scale)
            out, lses = out.unflatten(0, (n, nw)), [lse]
        else:  # one call per window position (its own mask); outputs written in the kernel's layout
            out = q.new_empty(n, nw, q.shape[3], heads, q.shape[4]).transpose(-3, -2)
            lses = []
            for i, mask in enumerate(_window_masks(masks, nw, q.dtype)):
                o, lse = FLASH_CPU(q[:, i], k[:, i], v[:, i], attn_mask=mask, scale=scale)
                out[:, i] = o
                lses.append(lse)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight, bias, image_term, masks, out, *lses)
        ctx.setup = (eps, heads, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, norm_weight, norm_bias, weight, bias, image_term, masks, out, *lses = ctx.saved_tensors
        eps, heads, scale = ctx.setup
        need_x, need_nw, need_nb, _, need_w, need_b, need_term = ctx.needs_input_grad[:7]
        z = torch.native_layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)[0]
        qkv = F.linear(z, weight, bias)
        if image_term is not None:
            _per_image(qkv, image_term.shape[0], image_term.shape[-1]).add_(image_term.unsqueeze(1))
        q, k, v = _heads(qkv, heads)
        grad_qkv = torch.empty_like(qkv)
        gq, gk, gv = _heads(grad_qkv, heads)
        n, nw = q.shape[:2]
        if masks is None:
            grads = FLASH_CPU_BACKWARD(grad_out.flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                       out.flatten(0, 1), lses[0], 0.0, False, scale=scale)
            for target, g in zip((gq, gk, gv), grads):
                target.copy_(g.unflatten(0, (n, nw)))
        else:
            for i, mask in enumerate(_window_masks(masks, nw, q.dtype)):
                grads = FLASH_CPU_BACKWARD(grad_out[:, i], q[:, i], k[:, i], v[:, i], out[:, i], lses[i], 0.0, False,
                                           attn_mask=mask, scale=scale)
                for target, g in zip((gq, gk, gv), grads):
                    target[:, i] = g
        del q, k, v, qkv
        need_z = need_x or need_nw or need_nb
        grad_z, grad_w, grad_b = _linear_backward(grad_qkv, z, weight, (need_z, need_w, need_b))
        grad_x = grad_nw = grad_nb = grad_term = None
        if need_z:
            grad_x, grad_nw, grad_nb = aten.native_layer_norm_backward(
                grad_z, x, [x.shape[-1]], mean, rstd, norm_weight, norm_bias, [need_x, need_nw, need_nb])
        if need_term:
            grad_term = _per_image(grad_qkv, image_term.shape[0], image_term.shape[-1]).sum(1)
        return grad_x, grad_nw, grad_nb, None, grad_w, grad_b, grad_term, None, None, None


def fused_attention_backward_available(x: torch.Tensor) -> bool:
    """Whether `norm_qkv_attention` can run: PyTorch's fused CPU attention and its backward."""
    return x.device.type == "cpu" and FLASH_CPU is not None and FLASH_CPU_BACKWARD is not None


def norm_qkv_attention(x: torch.Tensor, norm: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor,
                       image_term: Optional[torch.Tensor], heads: int, scale: float,
                       masks: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax attention of q, k, v = F.linear(norm(x), weight, bias) (+ `image_term` on q / k,
    see `norm_linear`) within each window. x: (n, nW, N, C); weight: (3C, C) packed [q; k; v];
    masks: (nW, N, N) additive per window position, or None. Returns (n, nW, heads, N, d), in the
    memory layout of (n, nW, N, heads, d). CPU (`fused_attention_backward_available`)."""
    return _NormQKVAttention.apply(x, norm.weight, norm.bias, norm.eps, weight, bias, image_term, heads, scale, masks)
