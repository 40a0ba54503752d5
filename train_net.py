#!/usr/bin/env python
"""Train or evaluate CAT-Seg (detectron2 command line).

  python train_net.py --config-file configs/vitl_swinb_384.yaml --num-gpus 4
  python train_net.py --config-file configs/ade150.yaml --eval-only MODEL.WEIGHTS model.pth
  python train_net.py --config-file ... --resume          # continue from OUTPUT_DIR/last_checkpoint

Multi-machine: --num-machines, --machine-rank, --dist-url (detectron2's launcher). With
MODEL.DEVICE cpu, --num-gpus N starts N CPU processes (gloo).
"""
import json
import os
import sys

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm

from catseg.checkpoint import CATSegCheckpointer
from catseg.config import load_config
from catseg.data.datasets import DatasetNotFoundError
from catseg.engine import CATSegTrainer, launch, prepare_datasets
from catseg.modeling.backbone.pretrained import (PretrainedWeightsError, check_weights_file, initial_backbone_source,
                                                 resolve_pretrained)


def evaluate(cfg, resume: bool = False):
    """Evaluate MODEL.WEIGHTS (or the last checkpoint with `resume`) on DATASETS.TEST.

    Writes OUTPUT_DIR/metrics_eval.json on the main process; returns the metrics.
    """
    model = CATSegTrainer.build_model(cfg)
    CATSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.CHECKPOINT_STRICT).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=resume)
    results = CATSegTrainer.test(cfg, model)
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "metrics_eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    if args.eval_only:
        return evaluate(cfg, resume=args.resume)
    trainer = CATSegTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_inputs(cfg, args) -> None:
    """Weights and datasets are there (backbone weights downloaded once, before any process
    starts); raises PretrainedWeightsError / DatasetNotFoundError with a one-line message."""
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not resuming:
        check_weights_file(cfg.MODEL.WEIGHTS)
    source = "" if args.eval_only else initial_backbone_source(cfg, resuming)
    if source:
        resolve_pretrained(source)
    prepare_datasets(cfg, list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)))


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    try:  # fail before spawning processes or building models, with one line
        check_inputs(cfg, args)
    except (DatasetNotFoundError, PretrainedWeightsError) as e:
        sys.exit(f"error: {e}")
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,), device=cfg.MODEL.DEVICE)


if __name__ == "__main__":
    cli()
