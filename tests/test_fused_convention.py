"""The fast-path convention: every module with a `forward_fused` has a `forward_plain` with the
same signature, `forward` dispatches on `fused`, and the paths agree, for the modules whose
paths tests/test_fused.py does not compare one to one."""
import inspect

import pytest
import torch
from test_fused import close, fused_and_plain, randn, randomize_

from catseg.modeling import aggregator, attention, clip_encoder
from catseg.modeling.aggregator import SwinTransformerBlock
from catseg.modeling.attention import AttentionLayer, ExtraTokens
from catseg.modeling.backbone import swin


def dual_path_classes():
    modules = [aggregator, attention, clip_encoder, swin]
    return [c for m in modules for c in vars(m).values()
            if isinstance(c, type) and issubclass(c, torch.nn.Module) and "forward_fused" in vars(c)]


def test_every_fast_path_has_a_plain_twin_with_its_signature():
    classes = dual_path_classes()
    assert {c.__name__ for c in classes} >= {"WindowAttention", "SwinTransformerBlock", "SwinTransformerBlockWrapper",
                                             "ClassTransformerLayer", "Up", "AttentionLayer", "DenseCLIPEncoder",
                                             "FusedWindowAttention"}
    for cls in classes:
        fused, plain, forward = (inspect.signature(getattr(cls, n))
                                 for n in ("forward_fused", "forward_plain", "forward"))
        assert list(fused.parameters) == list(plain.parameters) == list(forward.parameters), cls.__name__


@pytest.mark.parametrize("shift,guided", [(0, True), (2, True), (2, False)])
def test_swin_block_fused_matches_plain(shift, guided):
    fused, plain = fused_and_plain(randomize_(SwinTransformerBlock(16, 8 if guided else 0, (8, 8), 4, 4, shift)))
    x, g = randn(6, 8, 8, 16, seed=1), (randn(2, 8, 8, 8, seed=2) if guided else None)
    with torch.no_grad():
        assert close(fused(x, fused.prepare(g)), plain(x, plain.prepare(g)))


@pytest.mark.parametrize("guided", [True, False])
def test_attention_layer_extra_tokens_fused_matches_plain(guided):
    """Linear attention with appended tokens: the fused rank-1 term against explicit appending,
    guidance broadcast over positions."""
    fused, plain = fused_and_plain(randomize_(AttentionLayer(16, 8 if guided else 0, 4, "linear")))
    x = randn(2, 3, 5, 16, seed=1)
    g = randn(2, 1, 5, 8, seed=2) if guided else None
    token, token_guidance = randn(16, seed=3), (randn(8, seed=4) if guided else None)
    with torch.no_grad():
        extra = fused.extra_tokens(7, token, token_guidance)
        assert isinstance(extra, ExtraTokens)
        assert close(fused(x, fused.prepare(g), extra), plain(x, plain.prepare(g), extra))
        assert not close(fused(x, fused.prepare(g), extra), fused(x, fused.prepare(g)))  # the tokens enter the result


@pytest.mark.parametrize("masked", [False, True])
def test_swin_backbone_window_attention_fused_matches_plain(masked):
    attn = swin.WindowAttention(16, (4, 4), 4)
    attn.__class__ = swin.FusedWindowAttention
    randomize_(attn)
    fused, plain = fused_and_plain(attn)
    x = randn(6, 16, 16, seed=1)
    mask = torch.zeros(3, 16, 16).masked_fill(randn(3, 16, 16, seed=2) > 1, -100.0) if masked else None
    with torch.no_grad():
        assert close(fused(x, mask), plain(x, mask))
