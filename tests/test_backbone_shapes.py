"""Acceptance 1: every alternative backbone's output_shape() matches its outputs, and each
output of stride s is ceil(H / s) x ceil(W / s), for 384x384, 383x383 and 512x683 inputs.

The tiny configs (configs/backbones/tiny/*.yaml) are merged without their _BASE_ (the backbone
keys are all they set that the backbone reads); res5 is requested too, to cover stride 32.
"""
import math
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_backbone

from catseg import add_catseg_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "backbones" / "tiny"
CONFIGS = ["vit", "twins_svt", "twins_pcpvt", "cluster"]
SECTION = {"D2ViT": "VIT", "D2Twins": "TWINS", "D2ClusterBackbone": "CLUSTER"}


def tiny_cfg(name: str, out_features=("res2", "res3", "res4", "res5")):
    """Default catseg cfg + configs/backbones/tiny/<name>.yaml (without _BASE_)."""
    cfg = get_cfg()
    add_catseg_config(cfg)
    fragment = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    fragment.pop("_BASE_")
    cfg.merge_from_other_cfg(CfgNode(fragment))
    cfg.MODEL[SECTION[cfg.MODEL.BACKBONE.NAME]].OUT_FEATURES = list(out_features)
    return cfg


@pytest.mark.parametrize("name", CONFIGS)
def test_output_shapes(name):
    torch.manual_seed(0)
    backbone = build_backbone(tiny_cfg(name)).eval()
    spec = backbone.output_shape()
    assert {k: s.stride for k, s in spec.items()} == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert backbone.size_divisibility == 32
    with torch.no_grad():
        for h, w in [(384, 384), (383, 383), (512, 683)]:
            out = backbone(torch.randn(1, 3, h, w))
            assert set(out) == set(spec)
            for k, feature in out.items():
                s = spec[k].stride
                assert tuple(feature.shape) == (1, spec[k].channels, math.ceil(h / s), math.ceil(w / s)), (k, h, w)


def test_full_configs_name_registered_backbones(repo_root):
    """Every backbone config only uses known keys, selects a registered backbone, leaves the
    guidance dims to be derived and trains the backbone at lr x 0.01."""
    from detectron2.modeling import BACKBONE_REGISTRY

    paths = sorted((repo_root / "configs" / "backbones").glob("*.yaml")) + sorted(TINY.glob("*.yaml"))
    assert len(paths) == 8
    for path in paths:
        cfg = yaml.safe_load(path.read_text())
        cfg.pop("_BASE_")
        defaults = get_cfg()
        add_catseg_config(defaults)
        defaults.merge_from_other_cfg(CfgNode(cfg))  # raises on unknown keys
        assert cfg["MODEL"]["BACKBONE"]["NAME"] in BACKBONE_REGISTRY, path
        assert cfg["MODEL"]["SEM_SEG_HEAD"] == {"APPEARANCE_GUIDANCE_DIM": 0, "DECODER_GUIDANCE_DIMS": []}, path
        assert cfg["SOLVER"]["BACKBONE_MULTIPLIER"] == 0.01, path
