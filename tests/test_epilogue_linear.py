"""`epilogue_linear.linear` (oneDNN matmul, bias in the epilogue) against F.linear (the plain
path): the same values up to rounding, taken exactly where it applies, and the plain F.linear
everywhere else."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from catseg.modeling.epilogue_linear import apply_linear, epilogue_bias_applies, linear, linear_activation


def operands(*shape, out=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g), torch.randn(out, shape[-1], generator=g) * 0.1,
            torch.randn(out, generator=g))


def ops_run(fn) -> set:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("shape", [(37, 16), (3, 37, 16), (2, 4, 9, 16)])
def test_epilogue_path_matches_f_linear_without_the_bias_copy(shape):
    x, w, b = operands(*shape)
    with torch.inference_mode():
        assert epilogue_bias_applies(x, w, b)
        out = linear(x, w, b)
        ran = ops_run(lambda: linear(x, w, b))
    assert out.shape == (*shape[:-1], 24)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert "mkldnn::_linear_pointwise" in ran and "aten::addmm" not in ran and "aten::copy_" not in ran


def test_plain_path_elsewhere_is_f_linear_bit_for_bit():
    x, w, b = operands(5, 7, 16)
    with torch.inference_mode():
        assert not epilogue_bias_applies(x, w, None)  # no bias: nothing to fuse
        assert torch.equal(linear(x, w), F.linear(x, w))
        strided = x.transpose(0, 1)
        assert not epilogue_bias_applies(strided, w, b)
        assert torch.equal(linear(strided, w, b), F.linear(strided, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 product, not an fp32 one
            assert not epilogue_bias_applies(x, w, b) and linear(x, w, b).dtype == torch.bfloat16
    x.requires_grad_(True)  # autograd on: F.linear, differentiable
    out = linear(x, w, b)
    out.sum().backward()
    assert torch.equal(out, F.linear(x, w, b)) and x.grad is not None


def test_apply_linear_keeps_overridden_forwards():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(4, 8)
    layer, scaled = nn.Linear(8, 3), Scaled(8, 3)
    scaled.load_state_dict(layer.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(apply_linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(apply_linear(scaled, x), scaled(x))
        assert torch.equal(apply_linear(nn.Identity(), x), x)


@pytest.mark.parametrize("activation, op", [(F.gelu, "aten::gelu"), (F.relu, "aten::relu")])
def test_activation_in_the_epilogue_matches_the_plain_layer_and_activation(activation, op):
    x, w, b = operands(3, 37, 16, out=64)
    layer = nn.Linear(16, 64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    with torch.inference_mode():
        out = linear_activation(x, layer, activation)
        ran = ops_run(lambda: linear_activation(x, layer, activation))
        expected = activation(F.linear(x, w, b))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert "mkldnn::_linear_pointwise" in ran and op not in ran and "aten::clamp_min" not in ran


def test_activation_epilogue_declines_what_it_does_not_compute():
    """None (the caller runs the plain layer and activation): tanh GELU, other activations,
    an overridden forward, autograd."""
    x = torch.randn(4, 8)
    layer = nn.Linear(8, 3)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with torch.inference_mode():
        assert linear_activation(x, layer, lambda t: F.gelu(t, approximate="tanh")) is None
        assert linear_activation(x, layer, torch.sigmoid) is None
        assert linear_activation(x, Scaled(8, 3), F.relu) is None
        assert linear_activation(x, layer, F.relu) is not None
    assert linear_activation(x, layer, F.relu) is None  # autograd on
