"""CATSegTrainer: detectron2's DefaultTrainer with the CAT-Seg recipe and exact resume.

Differences from DefaultTrainer:
- optimizer: `catseg.engine.solver.build_optimizer` (official parameter groups, full-model
  gradient clipping);
- training data: the mapper of INPUT.DATASET_MAPPER_NAME over a resumable stream
  (`catseg.engine.data_stream`): after `--resume` the run sees exactly the batches and
  augmentations the uninterrupted run would have seen;
- every iteration seeds torch's RNG (drop path, ...) from (data seed, iteration, rank), and the
  data seed is saved in checkpoints, so resumed weights equal uninterrupted ones;
- DDP without device_ids on CPU (gloo processes started by `catseg.engine.launch`);
- checkpoints through `CATSegCheckpointer` (atomic saves, one mismatch report, strict option);
  a run from scratch starts the guidance backbone from MODEL.BACKBONE.PRETRAINED (ImageNet);
- evaluation with the dataset's evaluator (`catseg.evaluation.build_evaluator`), after checking
  that each dataset's folders exist; `evaluate` adds test-time augmentation (TEST.AUG) results;
- the model printout goes to OUTPUT_DIR/log.txt only (catseg.console.FILE_ONLY);
- SOLVER.AMP.ENABLED (approximate) trains under bfloat16 autocast on CPU or GPU, applied by the
  model's forward (`CATSeg.run_network`), with detectron2's SimpleTrainer: no GradScaler
  (bfloat16 has float32's range), fp32 weights, gradients and optimizer state; detectron2's
  AMPTrainer (float16, CUDA only) is not used;
- a non-finite loss (detectron2's FloatingPointError, raised before the optimizer step) stops
  training with `TrainingDivergedError`: one line naming the iteration and the last checkpoint
  to resume from (`--resume`), without detectron2's traceback in the log.
"""
import logging
import os
import weakref

import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..console import FILE_ONLY
from ..data.datasets import check_dataset_exists, register_from_config
from ..data.mapper import SemSegDatasetMapper
from ..errors import CatsegError
from ..evaluation import build_evaluator
from ..modeling.meta_arch import full_probabilities
from ..modeling.tta import CATSegWithTTA
from ..weights.checkpointer import CATSegCheckpointer
from ..weights.pretrained import initial_backbone_source, resolve_pretrained
from .data_stream import build_resumable_train_loader, mix_seed
from .solver import build_optimizer

TRAIN_MAPPERS = {"mask_former_semantic": SemSegDatasetMapper}


class TrainingDivergedError(CatsegError):
    """The loss became NaN or infinite; the message names the iteration and the last checkpoint."""


class DropCatsegTraceback(logging.Filter):
    """Drops detectron2's tracebacks ("Exception during training", "Exception in writing
    metrics") of a CatsegError or a non-finite loss: a one-line message reports them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], (CatsegError, FloatingPointError)))


logging.getLogger("detectron2.engine.train_loop").addFilter(DropCatsegTraceback())


def create_ddp_model_any_device(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """create_ddp_model, with device_ids=None when the model is on the CPU (gloo). Trainable
    parameters that the model never uses (`unused_parameter_names`, e.g. the q / k weights of
    CLIP's dense last block in the split layout) are left out of DDP's gradient reduction."""
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    unused = getattr(model, "unused_parameter_names", lambda: [])()
    if unused and comm.get_world_size() > 1:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, unused)
    return create_ddp_model(model, **kwargs)


def prepare_datasets(cfg, names) -> None:
    """Register DATASETS.CUSTOM and check that every dataset in `names` is on disk.

    A missing folder raises catseg.data.datasets.DatasetNotFoundError whose one-line message
    names the path and the prepare script.
    """
    register_from_config(cfg)
    for name in names:
        check_dataset_exists(name)


def data_seed(cfg) -> int:
    """cfg.SEED when set (>= 0), otherwise a seed shared by all ranks."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


class DataStreamState(hooks.HookBase):
    """Saves the data seed in checkpoints and restores it (with the stream position) on resume."""

    def state_dict(self):
        return {"seed": self.trainer.train_sampler.seed}

    def load_state_dict(self, state):
        self.trainer.set_data_seed(state["seed"])


class CATSegTrainer(DefaultTrainer):
    """DefaultTrainer for CAT-Seg; see the module docstring."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        prepare_datasets(cfg, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self.data_seed = data_seed(cfg)
        data_loader, self.train_sampler = self.build_resumable_train_loader(cfg, self.data_seed)
        model = create_ddp_model_any_device(model, broadcast_buffers=False)
        self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = CATSegCheckpointer(model, cfg.OUTPUT_DIR, strict=cfg.MODEL.CHECKPOINT_STRICT,
                                               trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks() + [DataStreamState()])

    def set_data_seed(self, seed: int) -> None:
        """Use `seed` for the sampler, the augmentations and the per-iteration torch seed."""
        self.data_seed = seed
        self.train_sampler.seed = seed

    def resume_or_load(self, resume=True):
        """Resume, or load MODEL.WEIGHTS, or (neither given) MODEL.BACKBONE.PRETRAINED into the backbone."""
        source = initial_backbone_source(self.cfg, resume and self.checkpointer.has_checkpoint())
        if source:
            self.checkpointer.load(resolve_pretrained(source), checkpointables=[])
        super().resume_or_load(resume=resume)
        self.train_sampler.set_start_iter(self.start_iter)

    def run_step(self):
        # Create the loader iterator first: creating it draws from torch's RNG (worker base
        # seed), which would otherwise shift the model's random stream in the first step only.
        self._trainer._data_loader_iter
        torch.manual_seed(mix_seed(self.data_seed, self.iter * comm.get_world_size() + comm.get_rank()))
        try:
            super().run_step()
        except FloatingPointError:
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""
            where = f"resume from the last checkpoint, {last}, with --resume" if last else "no checkpoint was saved yet"
            raise TrainingDivergedError(
                f"the loss became NaN or infinite at iteration {self.iter} (weights not updated by it); {where} "
                "(lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS if it recurs)") from None

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logging.getLogger(__name__).info(f"Model:\n{model}", extra=FILE_ONLY)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_resumable_train_loader(cls, cfg, seed: int):
        """(loader, sampler) over DATASETS.TRAIN with the configured training mapper."""
        name = cfg.INPUT.DATASET_MAPPER_NAME
        if name not in TRAIN_MAPPERS:
            raise ValueError(f"INPUT.DATASET_MAPPER_NAME {name!r}: expected one of {sorted(TRAIN_MAPPERS)}")
        dicts = [d for dataset in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(dataset)]
        return build_resumable_train_loader(
            dicts, TRAIN_MAPPERS[name](cfg, True), total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            seed=seed, num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_train_loader(cls, cfg):
        return cls.build_resumable_train_loader(cfg, data_seed(cfg))[0]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's test; the evaluators read the (T, H, W) probabilities whatever TEST.OUTPUT says."""
        prepare_datasets(cfg, cfg.DATASETS.TEST)
        with full_probabilities(model):
            return super().test(cfg, model, evaluators)

    @classmethod
    def test_with_tta(cls, cfg, model):
        """`test` of the model under test-time augmentation (catseg/modeling/tta.py); results
        under "<name>_TTA", evaluator files in OUTPUT_DIR/inference_TTA (as the official trainer)."""
        evaluators = [cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
                      for name in cfg.DATASETS.TEST]
        results = cls.test(cfg, CATSegWithTTA(cfg, model), evaluators)
        return {f"{k}_TTA": v for k, v in results.items()}

    @classmethod
    def evaluate(cls, cfg, model):
        """`test`, plus `test_with_tta` beside it when TEST.AUG.ENABLED."""
        results = dict(cls.test(cfg, model))
        if cfg.TEST.AUG.ENABLED:
            results.update(cls.test_with_tta(cfg, model))
        return results
