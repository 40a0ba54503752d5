"""Optimizer parameter groups of the official recipe (lr 2e-4 x BACKBONE_MULTIPLIER / CLIP_MULTIPLIER
by module name, decay 1e-4 except 0 for norm layers, nn.Embedding modules and parameters named
relative_position_bias_table / absolute_pos_embed; nothing else), checked per parameter on the
real-size L and B architectures (random weights, no text encoding), and full-model gradient
clipping."""
import pytest
import torch
from detectron2.modeling import build_model
from helpers import make_cfg, param_names_by_group
from torch import nn

from catseg.engine.solver import build_optimizer

BASE_LR, DECAY = 2e-4, 1e-4
NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _real_size(config):
    cfg = make_cfg(config, ["MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "random"])
    torch.manual_seed(0)
    model = build_model(cfg)
    return cfg, model, param_names_by_group(model, build_optimizer(cfg, model))


@pytest.fixture(scope="module", params=["vitl_swinb_384.yaml", "vitb_r101_384.yaml"])
def built(request):
    return (request.param,) + _real_size(request.param)


def _expected(cfg, model, name):
    """lr and decay by the written rule, from the parameter's module."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    lr = BASE_LR
    if "backbone" in module_name:
        lr *= cfg.SOLVER.BACKBONE_MULTIPLIER
    if "clip_model" in module_name:
        lr *= cfg.SOLVER.CLIP_MULTIPLIER
    decay = DECAY
    if isinstance(module, NORMS) or isinstance(module, nn.Embedding) or leaf in (
            "relative_position_bias_table", "absolute_pos_embed"):
        decay = 0.0
    return lr, decay


def test_every_trainable_parameter_follows_the_rule(built):
    config, cfg, model, groups = built
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups) == trainable, "frozen parameters must be absent, trainable ones present"
    for name, hp in groups.items():
        lr, decay = _expected(cfg, model, name)
        assert hp["lr"] == pytest.approx(lr, rel=1e-12), name
        assert hp["weight_decay"] == decay, name


def test_categories(built):
    """Spot values per category, written out (not derived from the rule)."""
    config, cfg, model, groups = built
    clip = "sem_seg_head.predictor.clip_model."
    agg = "sem_seg_head.predictor.transformer."
    # CLIP attention: lr 2e-6, decay 1e-4; positional_embedding keeps decay.
    assert (groups[clip + "visual.transformer.resblocks.0.attn.in_proj_weight"]
            == pytest.approx({"lr": 2e-6, "weight_decay": 1e-4}))
    assert groups[clip + "visual.positional_embedding"] == pytest.approx({"lr": 2e-6, "weight_decay": 1e-4})
    # CLIP MLP and the whole text tower are frozen (CLIP_FINETUNE attention).
    assert clip + "visual.transformer.resblocks.0.mlp.c_fc.weight" not in groups
    assert not any(n.startswith(clip) and not n.startswith(clip + "visual.") for n in groups)
    assert clip + "token_embedding.weight" not in groups
    # aggregator: biases keep decay; norms get none.
    assert groups[agg + "conv1.weight"] == pytest.approx({"lr": BASE_LR, "weight_decay": DECAY})
    assert groups[agg + "conv1.bias"] == pytest.approx({"lr": BASE_LR, "weight_decay": DECAY})
    norm = next(n for n, m in model.named_modules() if n.startswith(agg) and isinstance(m, nn.LayerNorm))
    assert groups[norm + ".weight"] == pytest.approx({"lr": BASE_LR, "weight_decay": 0.0})
    assert groups[norm + ".bias"] == pytest.approx({"lr": BASE_LR, "weight_decay": 0.0})
    gn = next(n for n, m in model.named_modules() if n.startswith(agg) and isinstance(m, nn.GroupNorm))
    assert groups[gn + ".weight"]["weight_decay"] == 0.0
    backbone = [n for n in dict(model.named_parameters()) if n.startswith("backbone.")]
    if config == "vitl_swinb_384.yaml":
        assert not any(n in groups for n in backbone), "L: Swin frozen (BACKBONE_MULTIPLIER 0)"
    else:
        conv = "backbone.res2.0.conv1.weight"
        assert groups[conv] == pytest.approx({"lr": 2e-6, "weight_decay": 1e-4})
        bn = "backbone.res2.0.conv1.norm.weight"
        assert bn not in groups or groups[bn]["weight_decay"] == 0.0


def test_swin_tables_and_embeddings_get_no_decay():
    """relative_position_bias_table / absolute_pos_embed (Swin, trainable here) and nn.Embedding."""
    cfg = make_cfg("tiny.yaml", ["SOLVER.BACKBONE_MULTIPLIER", "0.1", "MODEL.SWIN.APE", "True",
                                 "SOLVER.WEIGHT_DECAY_EMBED", "0.5"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.sem_seg_head.predictor.transformer.extra_embedding = nn.Embedding(3, 4)
    groups = param_names_by_group(model, build_optimizer(cfg, model))
    tables = [n for n in groups if n.endswith("relative_position_bias_table")]
    assert tables and all(groups[n] == pytest.approx({"lr": 2e-5, "weight_decay": 0.0}) for n in tables)
    assert groups["backbone.absolute_pos_embed"] == pytest.approx({"lr": 2e-5, "weight_decay": 0.0})
    assert groups["backbone.layers.0.blocks.0.attn.qkv.weight"] == pytest.approx({"lr": 2e-5, "weight_decay": 1e-4})
    assert groups["sem_seg_head.predictor.transformer.extra_embedding.weight"]["weight_decay"] == 0.5


def test_full_model_clipping_clips_the_global_norm():
    cfg = make_cfg("tiny.yaml", ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5"])
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = build_optimizer(cfg, model)
    assert type(opt).__name__ == "AdamWWithGradientClip"
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    opt.step()
    total = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total == pytest.approx(0.5, rel=1e-5)
    ratios = {round(float(p.grad.flatten()[0] / 3.0), 6) for p in model.parameters()}
    assert len(ratios) == 1, "one common scale factor for the whole model"
