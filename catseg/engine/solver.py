"""Optimizer of the official CAT-Seg recipe: parameter groups, AdamW/SGD, gradient clipping.

Parameter groups, exactly as the official recipe builds them: every trainable parameter gets
SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY, then
- lr x SOLVER.BACKBONE_MULTIPLIER if its module's name contains "backbone",
- lr x SOLVER.CLIP_MULTIPLIER if its module's name contains "clip_model",
- decay SOLVER.WEIGHT_DECAY_NORM if its module is a norm layer (detectron2's list: BatchNorm*,
  SyncBatchNorm, GroupNorm, InstanceNorm*, LayerNorm, LocalResponseNorm),
- decay SOLVER.WEIGHT_DECAY_EMBED if its module is an nn.Embedding,
- decay 0 if the parameter is named relative_position_bias_table or absolute_pos_embed.
Nothing else: biases and CLIP's `positional_embedding` (a plain parameter, not an Embedding
module) keep the default decay; frozen parameters are not in the optimizer.
"""
from typing import Any, Dict, List

import torch
from detectron2.solver.build import (
    _generate_optimizer_class_with_gradient_clipping,
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)
from torch import nn

NO_DECAY_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def module_lr_factor(cfg, param_name: str) -> float:
    """lr multiplier of the parameter `param_name` ("module.path.param") from its module's name."""
    module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    factor = 1.0
    if "backbone" in module_name:
        factor *= cfg.SOLVER.BACKBONE_MULTIPLIER
    if "clip_model" in module_name:
        factor *= cfg.SOLVER.CLIP_MULTIPLIER
    return factor


def build_param_groups(cfg, model: nn.Module) -> List[Dict[str, Any]]:
    """Optimizer parameter groups (list of {"params", "lr", "weight_decay"}) of `model`."""
    groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_factor_func=lambda name: module_lr_factor(cfg, name),
        overrides={name: {"weight_decay": 0.0} for name in NO_DECAY_PARAM_NAMES},
    )
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                        for p in m.parameters(recurse=False)}
    if embedding_params:
        expanded = [dict(g, params=[p]) for g in groups for p in g["params"]]
        for g in expanded:
            if id(g["params"][0]) in embedding_params:
                g["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_EMBED
        groups = reduce_param_groups(expanded)
    return groups


def add_full_model_gradient_clipping(cfg, optimizer_type):
    """`optimizer_type` with gradient clipping from SOLVER.CLIP_GRADIENTS.

    CLIP_TYPE "full_model" clips the norm of all parameters' gradients taken together (one
    global norm, as torch.nn.utils.clip_grad_norm_ over the whole model); "value" / "norm" are
    detectron2's per-parameter clippers.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return optimizer_type
    if clip.CLIP_TYPE != "full_model":
        return maybe_add_gradient_clipping(cfg, optimizer_type)

    def clip_all(params):
        torch.nn.utils.clip_grad_norm_(list(params), clip.CLIP_VALUE, clip.NORM_TYPE)

    return _generate_optimizer_class_with_gradient_clipping(optimizer_type, global_clipper=clip_all)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER ("ADAMW" or "SGD") over `build_param_groups`, with gradient clipping."""
    groups = build_param_groups(cfg, model)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        return add_full_model_gradient_clipping(cfg, torch.optim.AdamW)(
            groups, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    if name == "SGD":
        return add_full_model_gradient_clipping(cfg, torch.optim.SGD)(
            groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY, nesterov=cfg.SOLVER.NESTEROV)
    raise ValueError(f"SOLVER.OPTIMIZER {cfg.SOLVER.OPTIMIZER!r}: expected 'ADAMW' or 'SGD'")


__all__ = ["build_optimizer", "build_param_groups", "add_full_model_gradient_clipping",
           "module_lr_factor"]
