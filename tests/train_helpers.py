"""Helpers for the training / evaluation tests: a miniature quick-start dataset and configs,
fingerprints of mapped batches."""
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import List

from helpers import make_cfg

from catseg.data.quickstart import generate

REPO = Path(__file__).resolve().parents[1]


def mini_quickstart(root: Path, train: int = 8, val: int = 4, size: int = 64) -> Path:
    """A small quick-start dataset under `root` (same generator, fewer and smaller images)."""
    return generate(str(root), seed=0, size=size, counts={"train": train, "val": val})


def quickstart_opts(data: Path, out: Path, **solver):
    """Opts pointing configs/quickstart.yaml at `data` and `out` (test and train datasets renamed)."""
    opts = [
        "DATASETS.CUSTOM", str([f"qs_train:{data}/images/train:{data}/labels/train:{data}/classes.json",
                                f"qs_val:{data}/images/val:{data}/labels/val:{data}/classes.json"]),
        "DATASETS.TRAIN", "('qs_train',)", "DATASETS.TEST", "('qs_val',)",
        "MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON", f"{data}/classes.json",
        "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", f"{data}/classes.json",
        "OUTPUT_DIR", str(out),
    ]
    for key, value in solver.items():
        opts += [key.replace("__", "."), str(value)]
    return opts


def quickstart_cfg(data: Path, out: Path, config: str = "quickstart.yaml", **solver):
    """configs/`config` (a quick-start config) with `quickstart_opts`."""
    return make_cfg(config, quickstart_opts(data, out, **solver))


def run_train_net(args, **env) -> subprocess.CompletedProcess:
    """`python train_net.py *args` in the repository, with extra environment variables."""
    return subprocess.run([sys.executable, "train_net.py", *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


def import_train_net():
    """The repository's train_net.py as a module."""
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch_fingerprint(batch: List[dict]) -> str:
    """Hex digest of a mapped batch's image and label tensors (to compare data streams)."""
    h = hashlib.sha1()
    for sample in batch:
        for key in ("image", "sem_seg"):
            if key in sample:
                h.update(sample[key].contiguous().numpy().tobytes())
    return h.hexdigest()
