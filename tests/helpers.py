"""Helpers shared by the model tests: building configs and models from the repo's configs,
reading back an optimizer's parameter groups."""
from pathlib import Path
from typing import Dict

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


def param_names_by_group(model, optimizer) -> Dict[str, Dict[str, float]]:
    """{parameter name: {"lr", "weight_decay"}} of every parameter in `optimizer`."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {"lr": g["lr"], "weight_decay": g["weight_decay"]}
            for g in optimizer.param_groups for p in g["params"]}
