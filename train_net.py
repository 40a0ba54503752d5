#!/usr/bin/env python
"""Train or evaluate CAT-Seg (detectron2 command line).

  python train_net.py --config-file configs/vitl_swinb_384.yaml --num-gpus 4
  python train_net.py --config-file configs/ade150.yaml --eval-only MODEL.WEIGHTS model.pth
  python train_net.py --config-file ... --resume          # continue from OUTPUT_DIR/last_checkpoint

Multi-machine: --num-machines, --machine-rank, --dist-url (detectron2's launcher). With
MODEL.DEVICE cpu, --num-gpus N starts N CPU processes (gloo).

Before any model is built, the config, datasets and class lists are checked: a problem ends
the run with one `error: ...` line and exit status 2 (`--debug` or CATSEG_DEBUG=1: traceback).
"""
import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent

EPILOG = f"""\
configs (in {REPO / 'configs'}):
  quickstart.yaml              tiny CAT-Seg on the synthetic quick-start data, CPU (make demo)
  tiny.yaml                    tiny CAT-Seg with random CLIP, for tests and CPU experiments
  vitl_swinb_384.yaml          CAT-Seg (L) recipe: COCO-Stuff train, Swin-B + ViT-L/14@336px
  vitb_r101_384.yaml           CAT-Seg (B) recipe: R101 + ViT-B/16
  ade150.yaml, ade847.yaml, pc59.yaml, pc459.yaml, voc20.yaml, voc20b.yaml, vitb/*.yaml
                               evaluation protocols of the benchmarks (L; B in vitb/)
Your own data: README.md, "Train on your own data".

examples:
  python train_net.py --config-file configs/quickstart.yaml
  python train_net.py --config-file configs/ade150.yaml --eval-only MODEL.WEIGHTS model_large.pth
  python train_net.py --config-file my_data.yaml SOLVER.MAX_ITER 200 MODEL.DEVICE cpu
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_net.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train or evaluate CAT-Seg. Every setting is a config key (catseg/config.py); "
                    "override any with KEY VALUE pairs after the options.")
    p.add_argument("--config-file", default="", metavar="FILE", help="config file (YAML), see the list below")
    p.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS on DATASETS.TEST, no training")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/last_checkpoint (model, optimizer, schedule, data position)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per machine: GPUs, or CPU processes with MODEL.DEVICE cpu (default 1)")
    p.add_argument("--num-machines", type=int, default=1, help="machines taking part (default 1)")
    p.add_argument("--machine-rank", type=int, default=0, help="rank of this machine, 0..num-machines-1")
    p.add_argument("--dist-url", default="auto", help="rendezvous URL of multi-machine runs (default: a free local port)")
    p.add_argument("--debug", action="store_true", help="show the traceback of start-up errors (or CATSEG_DEBUG=1)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides: KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth SOLVER.MAX_ITER 100")
    return p


def prepare_config(args):
    """The frozen config of `args`, its datasets registered and checked on disk, its class lists
    resolved (catseg.data.dataset_classes); raises CatsegError subclasses with one-line messages."""
    from catseg.config import load_config
    from catseg.data.dataset_classes import resolve_class_lists
    from catseg.engine import prepare_datasets

    cfg = load_config(args.config_file, args.opts)
    prepare_datasets(cfg, list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)))
    resolve_class_lists(cfg, train=not args.eval_only)
    cfg.freeze()
    return cfg


def evaluate(cfg, resume: bool = False):
    """Evaluate MODEL.WEIGHTS (or the last checkpoint with `resume`) on DATASETS.TEST.

    Writes OUTPUT_DIR/metrics_eval.json on the main process; returns the metrics.
    """
    from detectron2.utils import comm

    from catseg.checkpoint import CATSegCheckpointer
    from catseg.engine import CATSegTrainer

    model = CATSegTrainer.build_model(cfg)
    CATSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.CHECKPOINT_STRICT).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=resume)
    results = CATSegTrainer.test(cfg, model)
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "metrics_eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(args, cfg=None):
    """One process of the run (the launcher calls it once per process); `cfg`: the prepared
    config (default: prepare_config(args))."""
    from catseg.engine import CATSegTrainer
    from catseg.engine.run_setup import setup_run

    cfg = prepare_config(args) if cfg is None else cfg
    setup_run(cfg, args)
    if args.eval_only:
        return evaluate(cfg, resume=args.resume)
    trainer = CATSegTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def start(args):
    """Check everything that can be checked up front (one-line errors), then launch `main`."""
    from detectron2.data import DatasetCatalog

    from catseg.engine import launch
    from catseg.output_dir import make_output_dir

    cfg = prepare_config(args)
    if cfg.OUTPUT_DIR:
        make_output_dir(cfg.OUTPUT_DIR)
    if not args.eval_only:  # reads and checks custom datasets' labels (ids in range, sizes)
        for name in cfg.DATASETS.TRAIN:
            DatasetCatalog.get(name)
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args, cfg), device=cfg.MODEL.DEVICE)


def cli(argv=None):
    args = build_parser().parse_args(argv)
    from catseg.console import setup_cli_logging
    from catseg.errors import report_errors

    setup_cli_logging()
    return report_errors(lambda: start(args), debug=args.debug)


if __name__ == "__main__":
    cli()
