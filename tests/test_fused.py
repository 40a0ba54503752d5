"""Every fused (fast) path equals its plain path (the official computation order), at random
weights, without any shared fixture: each block alone, and whole models (v1 and CVPR'24) over
whole-image and sliding-window inference, chunked inference and a training step with gradients.
"""
import copy

import pytest
import torch
from helpers import make_model

from catseg.modeling import attention
from catseg.modeling.aggregator import (
    ClassTransformerLayer,
    SwinTransformerBlockWrapper,
    Up,
    WindowAttention,
    set_fused,
)
from catseg.modeling.clip import build_clip
from catseg.modeling.clip_encoder import DenseCLIPEncoder

TOL = 1e-5


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter (zero-initialised ones, like the class padding, included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


def fused_and_plain(module):
    plain = copy.deepcopy(module)
    set_fused(module, True)
    set_fused(plain, False)
    return module, plain


def close(a, b, tol=TOL):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ attention functions
@pytest.mark.parametrize("heads", [1, 4])
def test_linear_attention_matches_plain(heads):
    q, k, v = randn(3, 5, 7, 16, seed=1), randn(3, 5, 7, 16, seed=2), randn(3, 5, 7, 16, seed=3)
    assert close(attention.linear_attention(q, k, v, heads), attention.linear_attention_plain(q, k, v, heads))


def test_full_attention_matches_plain():
    q, k, v = randn(2, 9, 16, seed=1), randn(2, 9, 16, seed=2), randn(2, 9, 16, seed=3)
    assert close(attention.full_attention(q, k, v, 4), attention.full_attention_plain(q, k, v, 4))


def test_extra_tokens_equal_explicit_padding():
    """n copies of one token as a rank-1 term = the copies appended to the sequence."""
    q, k, v = randn(2, 6, 7, 16, seed=1), randn(2, 6, 7, 16, seed=2), randn(2, 6, 7, 16, seed=3)
    k_pad, v_pad, n = randn(16, seed=4), randn(16, seed=5), 9
    fused = attention.linear_attention(q, k, v, 4, extra=attention.ExtraTokens(n, k_pad, v_pad))
    pad = lambda t, x: torch.cat([t, x.expand(2, 6, n, 16)], dim=2)  # noqa: E731
    plain = attention.linear_attention_plain(pad(q, torch.zeros(16)), pad(k, k_pad), pad(v, v_pad), 4)[:, :, :7]
    assert close(fused, plain)


def test_linear_attention_in_place_is_the_same_computation():
    """`inplace` overwrites the caller's q / k / v temporaries (strided views of one q|k tensor,
    as AttentionLayer passes them) and gives bit for bit the out-of-place result."""
    qk, v = randn(2, 6, 7, 32, seed=1), randn(2, 6, 7, 16, seed=3)
    extra = attention.ExtraTokens(5, randn(16, seed=4), randn(16, seed=5))
    expected = attention.linear_attention(qk[..., :16], qk[..., 16:], v, 4, extra=extra)
    with torch.inference_mode():
        q_k, v_in = qk.clone(), v.clone()
        out = attention.linear_attention(q_k[..., :16], q_k[..., 16:], v_in, 4, extra=extra, inplace=True)
    assert torch.equal(out, expected)
    assert not torch.equal(q_k, qk) and not torch.equal(v_in, v)  # the temporaries were reused


# ------------------------------------------------------------------ aggregator blocks
def test_window_attention_matches_plain():
    attn = randomize_(WindowAttention(16, 8, 4))
    x, g = randn(6, 4, 9, 16, seed=1), randn(2, 4, 9, 8, seed=2)
    mask = torch.zeros(4, 9, 9).masked_fill(randn(4, 9, 9, seed=3) > 1, -100.0)
    terms = attn.guidance_terms(g)
    plain = attn.forward_plain(x, g.repeat_interleave(3, dim=0), mask)
    assert close(attn(x, terms, mask), plain)


@pytest.mark.parametrize("guided", [True, False])
def test_spatial_aggregation_matches_plain(guided):
    fused, plain = fused_and_plain(randomize_(SwinTransformerBlockWrapper(16, 8 if guided else 0, (8, 8), 4, 4)))
    x, g = randn(6, 8, 8, 16, seed=1), (randn(2, 8, 8, 8, seed=2) if guided else None)
    assert close(fused(x, fused.prepare(g)), plain(x, plain.prepare(g)))


@pytest.mark.parametrize("pooling", [(1, 1), (2, 2)])
@pytest.mark.parametrize("pad_length,attention_type", [(0, "linear"), (0, "full"), (12, "linear"), (12, "full")])
@pytest.mark.parametrize("training", [False, True])
def test_class_aggregation_matches_plain(pooling, pad_length, attention_type, training):
    layer = randomize_(ClassTransformerLayer(16, 8, 4, attention_type, pooling, pooling, pad_length))
    fused, plain = fused_and_plain(layer.train(training))
    x, g = randn(2, 5, 8, 8, 16, seed=1), randn(2, 5, 8, seed=2)
    with torch.set_grad_enabled(training):
        expected = plain(x.clone(), g)
        for chunk in (0, 7):
            assert close(fused(x.clone(), g, chunk), expected)


def test_class_padding_changes_the_result():
    """The padding is not a no-op (it enters the attention sums): 12 vs no padding differ."""
    padded = randomize_(ClassTransformerLayer(16, 8, 4, "linear", (1, 1), (1, 1), 12))
    unpadded = ClassTransformerLayer(16, 8, 4, "linear", (1, 1), (1, 1), 0)
    unpadded.load_state_dict({k: v for k, v in padded.state_dict().items() if "padding" not in k})
    x, g = randn(2, 5, 8, 8, 16, seed=1), randn(2, 5, 8, seed=2)
    with torch.no_grad():
        assert (padded(x.clone(), g) - unpadded(x.clone(), g)).abs().max() > 1e-3


@pytest.mark.parametrize("guided", [True, False])
def test_decoder_stage_matches_plain(guided):
    fused, plain = fused_and_plain(randomize_(Up(32, 16, 8 if guided else 0)))
    x, g = randn(6, 32, 5, 7, seed=1), (randn(2, 8, 10, 14, seed=2) if guided else None)
    with torch.no_grad():
        assert close(fused(x, fused.prepare(g, (10, 14))), plain(x, plain.prepare(g, (10, 14))))


# ------------------------------------------------------------------ dense CLIP encoder
@pytest.mark.parametrize("dense_block,attn_weights", [("v1", "packed"), ("cvpr24", "split"), ("v1", "split")])
def test_dense_clip_matches_plain(dense_block, attn_weights):
    model, _ = build_clip("ViT-B/16", "catseg-cvpr24-tiny-b", "random")
    encoder = randomize_(DenseCLIPEncoder(model, dense_block, attn_weights), std=0.02)
    plain = copy.deepcopy(encoder)
    plain.fused = False
    images = randn(2, 3, 96, 128, seed=1)
    with torch.no_grad():
        out, ref = encoder(images, (3, 7)), plain(images, (3, 7))
    assert set(out) == {"dense", "block3", "block7"} and out["dense"].shape == (2, 64, 6, 8)
    for name in ref:
        assert close(out[name], ref[name]), name


def test_split_attention_weights_compute_the_packed_result():
    model, tokenizer = build_clip("ViT-B/16", "catseg-cvpr24-tiny-b", "random")
    packed = DenseCLIPEncoder(copy.deepcopy(model), "cvpr24", "packed")
    split = DenseCLIPEncoder(model, "cvpr24", "split")
    block = split.visual.transformer.resblocks[0].attn
    assert block.in_proj_weight is None and block.q_proj_weight.shape == (64, 64)
    images, tokens = randn(1, 3, 64, 64, seed=1), tokenizer(["a photo of a cat"])
    with torch.no_grad():
        assert close(split(images)["dense"], packed(images)["dense"])
        assert close(split.encode_text(tokens), packed.encode_text(tokens))


# ------------------------------------------------------------------ whole models
MODELS = {"v1": ("tiny.yaml", ["MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[2, 2]"]),
          "cvpr24": ("cvpr24/tiny_b.yaml", [])}


@pytest.fixture(scope="module", params=sorted(MODELS))
def models(request):
    config, opts = MODELS[request.param]
    model = randomize_(make_model(config, opts), std=0.02).eval()
    model.sem_seg_head.predictor.set_test_classes(["cat", "dog", "sky, heaven", "grass", "road"])
    return fused_and_plain(model)


@pytest.mark.parametrize("sliding", [False, True])
def test_whole_model_inference_matches_plain(models, sliding):
    fused, plain = models
    image = {"image": torch.randint(0, 256, (3, 120, 150), generator=torch.Generator().manual_seed(0)).float()}
    for m in models:
        m.sliding_window = sliding
    with torch.no_grad():
        expected = plain([image])[0]["sem_seg"]
        fused.budget.memory_mb, fused.budget.cpu_mb = 1e6, 0
        assert close(fused([image])[0]["sem_seg"], expected)
        fused.budget.memory_mb = 0.05  # chunked: classes one by one, a few positions at a time
        assert close(fused([image])[0]["sem_seg"], expected)
    fused.budget.memory_mb = 1024


def test_whole_model_training_step_matches_plain(models):
    """Same loss and same gradient for every trainable parameter."""
    losses, grads = [], []
    gen = torch.Generator().manual_seed(3)
    batch = [{"image": torch.randint(0, 256, (3, 96, 96), generator=gen).float(),
              "sem_seg": torch.randint(0, 5, (96, 96), generator=gen)} for _ in range(2)]
    for m in models:
        m.train()
        m.sem_seg_head.predictor.train_class_names = ["cat", "dog", "sky", "grass", "road"]
        m.zero_grad()
        torch.manual_seed(0)  # the same stochastic depth draws in the guidance backbone
        loss = m(batch)["loss_sem_seg"]
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        m.eval()
    assert close(losses[0], losses[1])
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for name in grads[1]:
        assert close(grads[0][name], grads[1][name], 1e-4), name


def test_unused_parameters_are_exactly_those_without_gradient():
    """CVPR'24 (split q/k/v): the dense last block's q and k weights get no gradient; the model
    names exactly the trainable parameters that never get one (DDP leaves them out)."""
    model = make_model("cvpr24/tiny_b.yaml", ["MODEL.SEM_SEG_HEAD.CLIP_FINETUNE", "blocks"]).train()
    model.sem_seg_head.predictor.train_class_names = ["cat", "dog"]
    gen = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(0, 256, (3, 64, 64), generator=gen).float(),
              "sem_seg": torch.randint(0, 2, (64, 64), generator=gen)}]
    model(batch)["loss_sem_seg"].backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == set(model.unused_parameter_names()) and len(no_grad) == 2
    assert make_model().unused_parameter_names() == []  # v1: packed weights, all read
