"""The package installs, imports, registers its components, and its entry points answer --help."""
import subprocess
import sys

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

import catseg


def test_import_registers_model_components():
    assert "CATSeg" in META_ARCH_REGISTRY
    assert "CATSegHead" in SEM_SEG_HEADS_REGISTRY
    assert "D2SwinTransformer" in BACKBONE_REGISTRY


def test_config_keys_registered_with_official_defaults():
    cfg = get_cfg()
    catseg.add_catseg_config(cfg)
    head = cfg.MODEL.SEM_SEG_HEAD
    assert head.CLIP_PIXEL_MEAN == [122.7709383, 116.7460125, 104.09373615]
    assert cfg.TEST.SLIDING_KERNEL == 384 and cfg.TEST.SLIDING_OVERLAP == 0.333
    assert tuple(cfg.TEST.SLIDING_OUT_RES) == (640, 640)
    assert cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY == 32
    assert cfg.MODEL.RESNETS.STEM_TYPE  # DeepLab keys come along for the official B config


def test_every_config_key_has_a_comment(repo_root):
    """config/keys.py declares each key on its own line with a comment."""
    lines = (repo_root / "catseg" / "config" / "keys.py").read_text().splitlines()
    assignments = [l for l in lines if l.strip().startswith(("cfg.", "head.")) and " = " in l
                   and not l.rstrip().endswith("CN()")]
    assert assignments and all("#" in l for l in assignments), [l for l in assignments if "#" not in l]


def test_shipped_configs_load(repo_root):
    for path in sorted((repo_root / "configs").rglob("*.yaml")):
        cfg = get_cfg()
        catseg.add_catseg_config(cfg)
        cfg.merge_from_file(str(path))


@pytest.mark.parametrize("script", ["train_net.py", "demo/demo.py", "demo/label.py"])
def test_entry_points_help(repo_root, script):
    result = subprocess.run([sys.executable, str(repo_root / script), "--help"], capture_output=True, text=True,
                            cwd=repo_root, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--config-file" in result.stdout
