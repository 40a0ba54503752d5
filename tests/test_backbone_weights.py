"""Acceptance 4 (a backbone saved in its native key layout and loaded through the config path
gives the same outputs; library-layout checkpoints load too, with a readable report) and
acceptance 5 (a backward pass reaches every trainable backbone parameter)."""
import pytest
import torch
from detectron2.modeling import build_backbone
from test_backbone_shapes import CONFIGS, SECTION, tiny_cfg

from catseg.weights.backbone import load_backbone_checkpoint

# Module prefix of the wrapped library network: stripping it gives timm's key layout.
LIBRARY_PREFIX = {"D2ViT": "vit.", "D2Twins": "twins.", "D2ClusterBackbone": "cluster."}


def build(cfg, seed):
    torch.manual_seed(seed)
    return build_backbone(cfg).eval()


@pytest.mark.parametrize("layout", ["native", "library"])
@pytest.mark.parametrize("name", CONFIGS)
def test_saved_weights_load_through_config(name, layout, tmp_path):
    cfg = tiny_cfg(name)
    source = build(cfg, seed=0)
    state = source.state_dict()
    if layout == "library":
        prefix = LIBRARY_PREFIX[cfg.MODEL.BACKBONE.NAME]
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    path = tmp_path / "backbone.pth"
    torch.save({"model": state}, path)

    x = torch.randn(1, 3, 64, 64)
    fresh = build(cfg, seed=1)
    with torch.no_grad():
        assert not torch.allclose(fresh(x)["res4"], source(x)["res4"])  # different init: the test can fail
    cfg.MODEL[SECTION[cfg.MODEL.BACKBONE.NAME]].WEIGHTS = str(path)
    cfg.MODEL.CHECKPOINT_STRICT = True  # anything missing / unexpected raises
    loaded = build(cfg, seed=1)
    with torch.no_grad():
        expected, actual = source(x), loaded(x)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], atol=0, rtol=0)


def test_report_lists_what_did_not_fit(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(3, 2), "1.weight": torch.zeros(2, 3), "extra": torch.zeros(1)}
    torch.save(state, tmp_path / "w.pth")
    report = load_backbone_checkpoint(model, str(tmp_path / "w.pth"))
    assert report.loaded == ["0.weight"]
    assert report.unexpected == ["extra"]
    assert report.shape_mismatch == ["1.weight (2, 3) vs (1, 3)"]
    assert report.missing == ["0.bias", "1.bias", "1.weight"]
    assert "unexpected (1): extra" in str(report)
    torch.testing.assert_close(model[0].weight, torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="does not fit"):
        load_backbone_checkpoint(model, str(tmp_path / "w.pth"), strict=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_gradient_reaches_every_trainable_parameter(name):
    """Training mode, a random projection of all outputs as the loss (a plain sum would be
    blind behind the output norms, whose outputs sum to a constant)."""
    backbone = build(tiny_cfg(name), seed=0).train()
    out = backbone(torch.randn(2, 3, 64, 96))
    torch.manual_seed(1)
    loss = sum((v * torch.randn_like(v)).sum() for v in out.values())
    loss.backward()
    dead = [n for n, p in backbone.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, dead


def test_vit_checkpoint_from_another_resolution_is_resampled(tmp_path):
    """A timm-layout ViT checkpoint made for 224x224 (14x14 position grid) loads into a 384x384
    D2ViT (24x24 grid): the position embedding is resampled, nothing is reported."""
    cfg = tiny_cfg("vit")
    cfg.MODEL.VIT.IMG_SIZE = 224
    source = build(cfg, seed=0)
    state = {k[len("vit."):]: v for k, v in source.state_dict().items() if k.startswith("vit.")}
    torch.save(state, tmp_path / "vit224.pth")
    cfg.MODEL.VIT.IMG_SIZE = 384
    target = build(cfg, seed=1)
    report = target.load_weights(str(tmp_path / "vit224.pth"))
    assert not report.unexpected and not report.shape_mismatch
    assert all(k.startswith(("pyramid.", "projections.")) for k in report.missing)
    assert target.vit.pos_embed.shape[1] == 1 + 24 * 24
    torch.testing.assert_close(target.vit.blocks[0].attn.qkv.weight, source.vit.blocks[0].attn.qkv.weight)
