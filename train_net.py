#!/usr/bin/env python
"""Train or evaluate CAT-Seg (detectron2 command line).

  python train_net.py --config-file configs/vitl_swinb_384.yaml --num-gpus 4
  python train_net.py --config-file configs/ade150.yaml --eval-only MODEL.WEIGHTS model.pth
  python train_net.py --config-file ... --resume          # continue from OUTPUT_DIR/last_checkpoint
  python train_net.py --config-file configs/vitl_swinb_384.yaml --eval-only --benchmarks all \
      MODEL.WEIGHTS model.pth OUTPUT_DIR output/eval       # the paper's six benchmarks, one table

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
from catseg.engine.benchmarks import benchmark_config, run_benchmarks, select_protocols
from catseg.modeling.backbone.pretrained import (PretrainedWeightsError, check_weights_file, initial_backbone_source,
                                                 resolve_pretrained)


def load_model(cfg, resume: bool):
    """The model of `cfg` with MODEL.WEIGHTS (or, with `resume`, the last checkpoint) loaded."""
    model = CATSegTrainer.build_model(cfg)
    CATSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.CHECKPOINT_STRICT).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=resume)
    return model


def evaluate(cfg, resume: bool = False):
    """Evaluate MODEL.WEIGHTS (or the last checkpoint with `resume`) on DATASETS.TEST.

    Writes OUTPUT_DIR/metrics_eval.json on the main process; returns the metrics.
    """
    results = CATSegTrainer.evaluate(cfg, load_model(cfg, resume))
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "metrics_eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    if getattr(args, "benchmarks", ""):  # absent from detectron2's own parser
        cfg = benchmark_config(cfg)
        return run_benchmarks(cfg, load_model(cfg, args.resume), select_protocols(args.benchmarks),
                              CATSegTrainer.evaluate, check_fn=lambda c, name: prepare_datasets(c, [name]),
                              strict=getattr(args, "strict", False))
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
    if args.benchmarks:  # missing benchmark datasets are skipped, unless --strict
        names = [p.dataset for p in select_protocols(args.benchmarks)] if args.strict else []
    else:
        names = list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN))
    prepare_datasets(cfg, names)


def argument_parser():
    """detectron2's arguments, plus the six-benchmark evaluation."""
    parser = default_argument_parser()
    parser.add_argument("--benchmarks", default="", help="with --eval-only: 'all' or some of "
                        "a847,pc459,a150,pc59,pas20,pas20b (official protocols, one table; catseg/engine/benchmarks.py)")
    parser.add_argument("--strict", action="store_true", help="with --benchmarks: a missing dataset is an error")
    return parser


def cli(argv=None):
    args = argument_parser().parse_args(argv)
    if args.benchmarks:
        if not args.eval_only:
            sys.exit("error: --benchmarks evaluates a trained model: add --eval-only")
        try:
            select_protocols(args.benchmarks)
        except ValueError as e:
            sys.exit(f"error: {e}")
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
