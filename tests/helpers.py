"""Helpers shared by the model tests: building configs and models from the repo's configs."""
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from catseg import add_catseg_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_cfg(config="tiny.yaml", opts=()):
    cfg = get_cfg()
    add_catseg_config(cfg)
    cfg.merge_from_file(str(CONFIGS / config))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def make_model(config="tiny.yaml", opts=(), seed=0):
    torch.manual_seed(seed)
    return build_model(make_cfg(config, opts))
