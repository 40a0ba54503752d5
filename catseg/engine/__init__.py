"""Training engine: optimizer recipe, resumable data stream, trainer, launcher."""
from .launch import launch
from .solver import build_optimizer, build_param_groups
from .trainer import CATSegTrainer, create_ddp_model_any_device, prepare_datasets

__all__ = ["CATSegTrainer", "build_optimizer", "build_param_groups", "create_ddp_model_any_device",
           "launch", "prepare_datasets"]
