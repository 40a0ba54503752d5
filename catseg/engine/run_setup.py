"""The start of a train_net.py process: detectron2's `default_setup`, with a quiet console.

Same steps as detectron2's default_setup (output folder, loggers, config.yaml backup, seeds,
cudnn benchmark), but the environment dump, the config file and the full config go to
OUTPUT_DIR/log.txt only (see catseg.console.FILE_ONLY), and colours only to a terminal.
"""
import os

import torch
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng

from ..app.output_dir import make_output_dir
from ..console import FILE_ONLY, setup_logging


def setup_run(cfg, args) -> None:
    """detectron2's default_setup(cfg, args) with the differences of the module docstring."""
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        make_output_dir(cfg.OUTPUT_DIR)
    rank = comm.get_rank()
    logger = setup_logging(cfg.OUTPUT_DIR, rank)
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment info:\n" + collect_env_info(), extra=FILE_ONLY)
    logger.info(f"Command line arguments: {args}")
    logger.info(f"Full config:\n{cfg.dump()}", extra=FILE_ONLY)
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
        with open(path, "w") as f:
            f.write(cfg.dump())
        logger.info(f"Full config saved to {path}")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
