#!/usr/bin/env python
"""Train or evaluate CAT-Seg (detectron2 command line).

  python train_net.py --config-file configs/vitl_swinb_384.yaml --num-gpus 4
  python train_net.py --config-file configs/ade150.yaml --eval-only MODEL.WEIGHTS model.pth
  python train_net.py --config-file ... --resume          # continue from OUTPUT_DIR/last_checkpoint
  python train_net.py --config-file configs/vitl_swinb_384.yaml --eval-only --benchmarks all \
      MODEL.WEIGHTS model.pth OUTPUT_DIR output/eval       # the paper's six benchmarks, one table
  python train_net.py --model cvpr24-large --eval-only --benchmarks all   # a released model by name

--model NAME: a released model's config (unless --config-file is given) and weights (MODEL.WEIGHTS,
downloaded on first use; a later MODEL.WEIGHTS override wins); --list-models prints the table
(catseg/weights/models.py). MODEL.WEIGHTS may be an `hf://` name or a huggingface.co link.

Multi-machine: --num-machines, --machine-rank, --dist-url (detectron2's launcher). With
MODEL.DEVICE cpu, --num-gpus N starts N CPU processes (gloo).

Before any model is built, the config, datasets and class lists are checked: a problem ends
the run with one `error: ...` line and exit status 2 (`--debug` or CATSEG_DEBUG=1: traceback).
"""
import argparse
import json
import os

EPILOG = """\
configs (configs/ of the repository; catseg.config.shipped_config(name) finds them in an install too):
  quickstart.yaml              tiny CAT-Seg on the synthetic quick-start data, CPU (make demo)
  tiny.yaml                    tiny CAT-Seg with random CLIP, for tests and CPU experiments
  cvpr24/vitl_336.yaml         CAT-Seg CVPR'24 (L) recipe: COCO-Stuff train, ViT-L/14@336px (model_large.pth)
  cvpr24/vitb_384.yaml         CAT-Seg CVPR'24 (B) recipe: ViT-B/16 (model_base.pth)
  vitl_swinb_384.yaml          CAT-Seg v1 (L) recipe: Swin-B + ViT-L/14@336px (model_final_large.pth)
  vitb_r101_384.yaml           CAT-Seg v1 (B) recipe: R101 + ViT-B/16 (model_final_base.pth)
  vith_swinb_384.yaml          CAT-Seg v1 (H) recipe: Swin-B + OpenCLIP ViT-H/14 (model_final_huge.pth)
  vitg_swinb_384.yaml          CAT-Seg v1 (G) recipe: Swin-B + OpenCLIP ViT-bigG/14 (model_final_giant.pth)
  ade150.yaml, ade847.yaml, pc59.yaml, pc459.yaml, voc20.yaml, voc20b.yaml
                               evaluation protocols of the benchmarks (v1 L; v1 B, H, G in vitb/,
                               vith/, vitg/; CVPR'24 in cvpr24/ and cvpr24/vitb/)
Your own data: README.md, "Train on your own data".

released models (--model NAME, --list-models): cvpr24-base, cvpr24-large, v1-base, v1-large,
  v1-huge, v1-giant

examples:
  python train_net.py --config-file configs/quickstart.yaml
  python train_net.py --model v1-large --config-file configs/ade150.yaml --eval-only
  python train_net.py --config-file configs/cvpr24/ade150.yaml --eval-only MODEL.WEIGHTS model_large.pth
  python train_net.py --config-file configs/cvpr24/vitl_336.yaml --eval-only --benchmarks all \\
      MODEL.WEIGHTS model_large.pth
  python train_net.py --config-file my_data.yaml SOLVER.MAX_ITER 200 MODEL.DEVICE cpu
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_net.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train or evaluate CAT-Seg. Every setting is a config key (catseg/config/keys.py); "
                    "override any with KEY VALUE pairs after the options.")
    p.add_argument("--config-file", default="", metavar="FILE", help="config file (YAML), see the list below")
    p.add_argument("--model", default="", metavar="NAME",
                   help="a released model: its config and weights (fine-tune it, or evaluate with --eval-only)")
    p.add_argument("--list-models", action="store_true", help="print the released models and exit")
    p.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS on DATASETS.TEST, no training")
    p.add_argument("--benchmarks", default="", metavar="LIST",
                   help="with --eval-only: 'all' or some of a847,pc459,a150,pc59,pas20,pas20b (official protocols, "
                        "one table; catseg/engine/benchmarks.py)")
    p.add_argument("--strict", action="store_true", help="with --benchmarks: a missing dataset is an error")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/last_checkpoint (model, optimizer, schedule, data position)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per machine: GPUs, or CPU processes with MODEL.DEVICE cpu (default 1)")
    p.add_argument("--num-machines", type=int, default=1, help="machines taking part (default 1)")
    p.add_argument("--machine-rank", type=int, default=0, help="rank of this machine, 0..num-machines-1")
    p.add_argument("--dist-url", default="auto",
                   help="rendezvous URL of multi-machine runs (default: a free local port)")
    p.add_argument("--debug", action="store_true", help="show the traceback of start-up errors (or CATSEG_DEBUG=1)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides: KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth SOLVER.MAX_ITER 100")
    return p


def prepare_config(args):
    """The frozen config of `args`, its weights checked (`check_weights`), its datasets registered
    and checked on disk, its class lists resolved (catseg.data.dataset_classes); raises
    CatsegError subclasses with one-line messages.
    With --benchmarks the protocols bring their own datasets and class lists: missing datasets
    are skipped then, unless --strict."""
    from catseg.config import load_config
    from catseg.data.dataset_classes import resolve_class_lists
    from catseg.engine import prepare_datasets
    from catseg.engine.benchmarks import select_protocols
    from catseg.weights.hub import fetch_config_weights

    cfg = load_config(args.config_file, args.opts)
    fetch_config_weights(cfg)
    check_weights(cfg, args)
    if args.benchmarks:
        prepare_datasets(cfg, [p.dataset for p in select_protocols(args.benchmarks)] if args.strict else [])
    else:
        prepare_datasets(cfg, list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)))
        resolve_class_lists(cfg, train=not args.eval_only)
    cfg.freeze()
    return cfg


def load_model(cfg, resume: bool):
    """The model of `cfg` with MODEL.WEIGHTS (or, with `resume`, the last checkpoint) loaded."""
    from catseg.engine import CATSegTrainer
    from catseg.modeling.build import build_from_checkpoint
    from catseg.weights.checkpointer import CATSegCheckpointer

    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")) or not cfg.MODEL.WEIGHTS:
        model = CATSegTrainer.build_model(cfg)
        CATSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.CHECKPOINT_STRICT).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=resume)
        return model
    return build_from_checkpoint(cfg)  # no random initialisation of what MODEL.WEIGHTS replaces


def evaluate(cfg, resume: bool = False):
    """Evaluate MODEL.WEIGHTS (or the last checkpoint with `resume`) on DATASETS.TEST (with TEST.AUG:
    test-time augmentation results beside the plain ones).

    Writes OUTPUT_DIR/metrics_eval.json on the main process; returns the metrics.
    """
    from detectron2.utils import comm

    from catseg.engine import CATSegTrainer

    results = CATSegTrainer.evaluate(cfg, load_model(cfg, resume))
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "metrics_eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(args, cfg=None):
    """One process of the run (the launcher calls it once per process); `cfg`: the prepared
    config (default: prepare_config(args))."""
    from catseg.engine import CATSegTrainer, prepare_datasets
    from catseg.engine.benchmarks import benchmark_config, run_benchmarks, select_protocols
    from catseg.engine.run_setup import setup_run

    cfg = prepare_config(args) if cfg is None else cfg
    setup_run(cfg, args)
    if args.benchmarks:
        cfg = benchmark_config(cfg)
        return run_benchmarks(cfg, load_model(cfg, args.resume), select_protocols(args.benchmarks),
                              CATSegTrainer.evaluate, check_fn=lambda c, name: prepare_datasets(c, [name]),
                              strict=args.strict)
    if args.eval_only:
        return evaluate(cfg, resume=args.resume)
    trainer = CATSegTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_weights(cfg, args) -> None:
    """MODEL.WEIGHTS exists, and the backbone's ImageNet weights of a run from scratch are
    downloaded once, before any process starts (one-line WeightsError otherwise)."""
    from catseg.weights.pretrained import check_weights_file, initial_backbone_source, resolve_pretrained

    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not resuming:
        check_weights_file(cfg.MODEL.WEIGHTS)
    source = "" if args.eval_only else initial_backbone_source(cfg, resuming)
    if source:
        resolve_pretrained(source)


def apply_model(args) -> None:
    """--model NAME: its config as --config-file (unless one is given), its weights as the first
    MODEL.WEIGHTS override (so a later one wins); in place."""
    from catseg.weights.models import released_model

    if args.model:
        model = released_model(args.model)
        args.config_file = args.config_file or model.config_path()
        args.opts = ["MODEL.WEIGHTS", model.weights] + list(args.opts)


def start(args):
    """Check everything that can be checked up front (one-line errors), then launch `main`."""
    from detectron2.data import DatasetCatalog

    from catseg.app.output_dir import make_output_dir
    from catseg.engine import launch
    from catseg.engine.benchmarks import select_protocols
    from catseg.errors import ConfigError

    if args.benchmarks:
        if not args.eval_only:
            raise ConfigError("--benchmarks evaluates a trained model: add --eval-only")
        try:
            select_protocols(args.benchmarks)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    apply_model(args)
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

    if args.list_models:
        from catseg.weights.models import format_model_table

        print(report_errors(format_model_table, debug=args.debug))
        return 0
    setup_cli_logging()
    return report_errors(lambda: start(args), debug=args.debug)


if __name__ == "__main__":
    cli()
