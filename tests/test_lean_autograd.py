"""The lean training functions against the autograd compositions they replace: same values,
same gradients for every input (float64, to 1e-10), and fewer bytes kept for the backward pass."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from catseg.modeling import lean_autograd as lean
from catseg.modeling.meta_arch import bce_loss

TOL = 1e-10


def gradients(fn, inputs):
    """fn(*inputs) and the gradients of a fixed random projection of it w.r.t. every input."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weight).sum().backward()
    return out.detach(), [None if t.grad is None else t.grad for t in inputs]


def assert_same(fn_a, fn_b, inputs):
    out_a, grads_a = gradients(fn_a, inputs)
    out_b, grads_b = gradients(fn_b, inputs)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=TOL)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=0, atol=TOL)


def assert_same_parameter_grads(fn_a, fn_b, inputs, params):
    """The gradients that fn_a and fn_b (closures over modules) leave in `params` are the same."""
    grads = []
    for fn in (fn_a, fn_b):
        for p in params:
            p.grad = None
        gradients(fn, inputs)
        grads.append([p.grad.clone() for p in params])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=0, atol=TOL)


def saved_bytes(fn, inputs) -> int:
    """Bytes of distinct storages autograd keeps for the backward pass of fn(*inputs)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def randn(*shape, grad=True, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


@pytest.fixture(autouse=True)
def float64():
    """Every test builds its tensors and modules in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def layer_norm(c, seed):
    norm = nn.LayerNorm(c)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * randn(c, grad=False, seed=seed))
        norm.bias.copy_(0.1 * randn(c, grad=False, seed=seed + 1))
    return norm


def test_norm_linear_with_image_term():
    """LayerNorm + linear + a per-image term on the leading columns (the window attention's q / k guidance)."""
    norm = layer_norm(8, 1)
    x, w, b = randn(6, 3, 5, 8), randn(12, 8, seed=2), randn(12, seed=3)
    term = randn(2, 3, 5, 4, seed=4)  # 2 images x 3 class slices each

    def plain(x, nw, nb, w, b, term):
        out = F.linear(F.layer_norm(x, (8,), nw, nb, norm.eps), w, b)
        return out + F.pad(term, (0, 8)).repeat_interleave(3, dim=0)

    def fast(x, nw, nb, w, b, term):
        return lean._NormLinear.apply(x, nw, nb, norm.eps, w, b, term)
    inputs = [x, norm.weight, norm.bias, w, b, term]
    assert_same(plain, fast, inputs)
    assert_same(lambda *a: plain(*a[:5], torch.zeros_like(term)), lambda *a: lean._NormLinear.apply(
        a[0], a[1], a[2], norm.eps, a[3], a[4], None), inputs)
    assert saved_bytes(fast, inputs) < saved_bytes(plain, inputs)


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu", "relu"])
@pytest.mark.parametrize("keep_hidden", [False, True])
def test_norm_mlp(activation, keep_hidden):
    norm = layer_norm(8, 1)
    fc1, fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
    act = {"gelu": F.gelu, "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h), "relu": F.relu}[activation]
    x = randn(2, 7, 8)

    def plain(x, *params):
        return fc2(act(fc1(norm(x))))

    def fast(x, *params):
        return lean.norm_mlp(x, norm, fc1, fc2, keep_hidden=keep_hidden, activation=activation)
    assert_same(plain, fast, [x])
    assert_same_parameter_grads(plain, fast, [x], [norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias])
    assert saved_bytes(fast, [x]) < saved_bytes(plain, [x])
    # the 4x-wide hidden layer (float64) is what keep_hidden adds, and all it adds
    with_hidden, without = (saved_bytes(lambda x: lean.norm_mlp(x, norm, fc1, fc2, keep, activation), [x])
                            for keep in (True, False))
    assert with_hidden - without == x.numel() * 4 * 8


def test_norm_mlp_frozen_parameters():
    """Frozen weights (CLIP's MLP under attention fine-tuning) get no gradient; the input still does."""
    norm = layer_norm(8, 1)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    for p in [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]:
        p.requires_grad_(False)
    assert_same(lambda x: fc2(F.gelu(fc1(norm(x)))), lambda x: lean.norm_mlp(x, norm, fc1, fc2), [randn(3, 8)])
    assert fc1.weight.grad is None


@pytest.mark.parametrize("bias", [False, True])
def test_norm_relu_conv(bias):
    norm = nn.GroupNorm(2, 8)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * randn(8, grad=False, seed=5))
        norm.bias.copy_(0.1 * randn(8, grad=False, seed=6))
    conv = nn.Conv2d(8, 4, 3, padding=1, bias=bias)
    y = randn(3, 8, 6, 5).contiguous(memory_format=torch.channels_last).detach().requires_grad_()

    def plain(y, *params):
        return conv(F.relu(norm(y)))

    def fast(y, *params):
        return lean.conv_after(lean.PreActivation(y, norm), conv.weight, conv.bias, padding=1)
    assert_same(plain, fast, [y])
    assert_same_parameter_grads(plain, fast, [y], [norm.weight, norm.bias, *conv.parameters()])
    assert saved_bytes(fast, [y]) < saved_bytes(plain, [y])
    torch.testing.assert_close(lean.PreActivation(y, norm).materialize(), F.relu(norm(y)), rtol=0, atol=0)


def test_permute_rows():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert_same(lambda x: x[:, order], lambda x: lean.permute_rows(x, order, torch.argsort(order)), [randn(2, 10, 3)])


def test_interleave_phases():
    """Phase (a, b) at (i + a, j + b) lands at (2i + a, 2j + b); the term is added per image."""
    h, w, c = 3, 4, 5
    phases, term = randn(4, h + 1, w + 1, 2, 2, c), randn(2, c, 2 * h, 2 * w, seed=1)

    def plain(phases, term):
        y = torch.stack([torch.stack([phases[:, a: a + h, b: b + w, a, b] for b in range(2)], dim=3)
                         for a in range(2)], dim=2)  # (n, h, 2, w, 2, C)
        return y.reshape(4, 2 * h, 2 * w, c).permute(0, 3, 1, 2) + term.repeat_interleave(2, dim=0)
    assert_same(plain, lean.interleave_phases, [phases, term])
    out = lean.interleave_phases(phases, None)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[1, :, 2 * 2 + 1, 2 * 3 + 0], phases[1, 2 + 1, 3, 1, 0], rtol=0, atol=0)


def test_upsampled_bce_matches_the_official_loss():
    logits = randn(2, 5, 6, 7)
    labels = torch.randint(0, 5, (2, 24, 28), generator=torch.Generator().manual_seed(1))
    labels[0, :5] = 255  # ignored pixels: all-negative targets, still in the mean
    assert_same(lambda x: bce_loss(x, labels, 255), lambda x: lean.upsampled_bce(x, labels, 255), [logits])
    labels = labels.to(torch.uint8)  # as the dataset mapper gives them
    assert_same(lambda x: bce_loss(x, labels, 255), lambda x: lean.upsampled_bce(x, labels, 255), [logits])
    assert saved_bytes(lambda x: lean.upsampled_bce(x, labels, 255), [logits]) < \
        saved_bytes(lambda x: bce_loss(x, labels, 255), [logits]) / 4


def test_lean_only_with_autograd_and_without_autocast():
    x = torch.zeros(2)
    assert lean.use_lean(x)
    with torch.no_grad():
        assert not lean.use_lean(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lean.use_lean(x)


@pytest.mark.parametrize("masked", [False, True])
def test_norm_qkv_attention(masked):
    """LayerNorm, packed q / k / v with the per-image q / k term, windowed softmax attention (with
    per-window additive masks), against the explicit computation; q / k / v are not stored."""
    n, nw, length, heads, d = 4, 3, 6, 2, 4
    c = heads * d
    norm = layer_norm(c, 1)
    x, w, b = randn(n, nw, length, c), randn(3 * c, c, seed=2), randn(3 * c, seed=3)
    term = randn(2, nw, length, 2 * c, seed=4)
    masks = (torch.zeros(nw, length, length).masked_fill(torch.rand(nw, length, length) < 0.3, -100.0)
             if masked else None)
    scale = d ** -0.5

    def plain(x, nw_, nb_, w, b, term):
        qkv = F.linear(F.layer_norm(x, (c,), nw_, nb_, norm.eps), w, b)
        qkv = qkv + F.pad(term, (0, c)).repeat_interleave(2, dim=0)
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(-3, -2) for t in qkv.split(c, dim=-1))
        logits = q @ k.transpose(-1, -2) * scale
        if masks is not None:
            logits = logits + masks.unsqueeze(1)
        return torch.softmax(logits, dim=-1) @ v

    def fast(x, nw_, nb_, w, b, term):
        return lean._NormQKVAttention.apply(x, nw_, nb_, norm.eps, w, b, term, heads, scale, masks)
    inputs = [x, norm.weight, norm.bias, w, b, term]
    assert lean.fused_attention_backward_available(x)
    assert_same(plain, fast, inputs)
    assert saved_bytes(fast, inputs) < saved_bytes(plain, inputs)
