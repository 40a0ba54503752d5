"""`tap_conv.conv_by_taps` (one product over the channels, shifted sums) against F.conv2d, and
the aggregator's head taking it exactly on its fused inference path."""
import pytest
import torch
import torch.nn.functional as F
from test_fused import randn
from torch.profiler import ProfilerActivity, profile

from catseg.modeling.aggregator import Aggregator
from catseg.modeling.tap_conv import conv_by_taps, shifted


def test_shifted_slices_keep_the_offset_inside_the_axis():
    assert shifted(0, 5) == (slice(0, 5), slice(0, 5))
    assert shifted(1, 5) == (slice(0, 4), slice(1, 5))  # out[y] += taps[y + 1], y < 4
    assert shifted(-2, 5) == (slice(2, 5), slice(0, 3))  # out[y] += taps[y - 2], y >= 2


@pytest.mark.parametrize("out_channels, kernel, bias, channels_last",
                         [(1, (3, 3), True, True), (1, (3, 3), False, False), (3, (1, 5), True, True),
                          (2, (5, 3), True, False)])
def test_conv_by_taps_is_the_same_padded_convolution(out_channels, kernel, bias, channels_last):
    x = randn(2, 6, 7, 9, seed=1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = randn(out_channels, 6, *kernel, seed=2), (randn(out_channels, seed=3) if bias else None)
    out = conv_by_taps(x, w, b)
    assert out.shape == (2, out_channels, 7, 9)
    torch.testing.assert_close(out, F.conv2d(x, w, b, padding=(kernel[0] // 2, kernel[1] // 2)),
                               rtol=1e-5, atol=1e-5)


def test_aggregator_head_uses_taps_only_on_the_fused_inference_path():
    agg = Aggregator(text_guidance_dim=0, appearance_guidance_dim=0, decoder_guidance_dims=(0, 0),
                     decoder_guidance_proj_dims=(8, 4), hidden_dim=32, decoder_dims=(32, 16), feature_resolution=(4, 4),
                     window_size=2, prompt_channel=2, nheads=2)
    y = randn(3, 16, 8, 8, seed=4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        agg.head.bias.fill_(0.5)
        expected = agg.head(y)
        fused = agg.head_logits(y)
        agg.fused = False
        plain = agg.head_logits(y)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, expected)  # the plain path is the module itself
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        agg.fused = True
        agg.head_logits(y)
    ran = {e.key for e in prof.key_averages()}
    assert "aten::convolution" not in ran and "aten::mm" in ran
    y.requires_grad_(True)
    assert torch.equal(agg.head_logits(y), agg.head(y))  # autograd: the convolution
