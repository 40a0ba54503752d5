"""Disks and files that fail: an output disk that fills up mid-run (a real 1 MB tmpfs when this
process may mount one, else a real file-size limit, RLIMIT_FSIZE), a corrupt label PNG in a
custom training set, a NaN loss in training and the resume after it."""
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import hooks
from train_helpers import mini_quickstart, quickstart_cfg

from catseg.data.datasets import DatasetError, register_custom_dataset
from catseg.engine import CATSegTrainer
from catseg.engine.trainer import TrainingDivergedError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "demo" / "samples" / "beach.jpg"
LIMIT = 1_000_000  # bytes of the small output disk


def small_disk(folder: Path):
    """Mount a LIMIT-byte tmpfs at `folder` -> "tmpfs"; where mounting is not allowed, "fsize"
    (the child then runs under RLIMIT_FSIZE: each file is cut at LIMIT bytes instead)."""
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return "tmpfs" if proc.returncode == 0 else "fsize"


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT // 4, LIMIT // 4))


def run_cli(inputs: Path, out: Path, cache: Path, limited: bool):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "catseg.app.cli", "--input", str(inputs), "--output", str(out),
                           "--vocab", "sky; sand; sea", "--batch-size", "1", "--opts", "MODEL.DEVICE", "cpu",
                           "MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR", str(cache), "TEST.MAX_INPUT_SIDE", "1600"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
                          preexec_fn=limit_file_size if limited else None)


def test_full_output_disk_one_line_no_half_file_rerun_finishes(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image
    for i in range(3):  # noise compresses badly: the first fits, the others' overlays (~3 MB) do not
        size = (150, 200) if i == 0 else (900, 1200)
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(inputs / f"img{i}.png")
    out = tmp_path / "out"
    kind = small_disk(out)
    try:
        proc = run_cli(inputs, out, tmp_path / "cache", limited=kind == "fsize")
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
        reason = "No space left on device" if kind == "tmpfs" else "File too large"
        assert f": {reason};" in errors[0] and "were written before it: free space and rerun" in errors[0]
        assert "Traceback" not in proc.stderr
        names = sorted(p.name for p in out.iterdir() if p.name != "lost+found")
        assert not [n for n in names if n.endswith(".tmp")], names  # no half-written file
        stems = {n.split("_")[0].split(".")[0] for n in names}
        assert stems and all({f"{s}_labels.png", f"{s}_overlay.png", f"{s}.json"} <= set(names) for s in stems)
        assert 1 <= len(stems) < 3
        if kind == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)  # space freed
        rerun = run_cli(inputs, out, tmp_path / "cache", limited=False)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert len([p for p in out.glob("*.json")]) == 3
        for record in (json.loads(p.read_text()) for p in out.glob("*.json")):
            assert (out / record["overlay"]).stat().st_size > 0
    finally:
        if kind == "tmpfs":
            subprocess.run(["umount", str(out)], check=True)


@pytest.fixture
def custom_set(tmp_path):
    root = mini_quickstart(tmp_path / "qs", train=4, val=1)
    labels = root / "labels" / "train"
    good = sorted(labels.iterdir())
    data = good[1].read_bytes()
    good[1].write_bytes(data[: len(data) // 2])  # truncated
    good[2].write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    return root, [good[1], good[2]]


def test_corrupt_label_is_one_line_before_training(custom_set, registered_datasets):
    root, broken = custom_set
    registered_datasets("broken_set")
    register_custom_dataset("broken_set", root / "images" / "train", root / "labels" / "train", root / "classes.json")
    with pytest.raises(DatasetError) as err:
        DatasetCatalog.get("broken_set")
    message = str(err.value)
    assert "\n" not in message and "2 corrupt or unreadable file(s)" in message
    assert all(str(path) in message for path in broken) and "DATALOADER.CORRUPT_LABELS skip" in message


def test_corrupt_labels_skipped_with_a_count(custom_set, registered_datasets, caplog):
    root, broken = custom_set
    registered_datasets("skip_set")
    register_custom_dataset("skip_set", root / "images" / "train", root / "labels" / "train", root / "classes.json",
                            corrupt="skip")
    records = DatasetCatalog.get("skip_set")
    assert len(records) == 2 and not {r["sem_seg_file_name"] for r in records} & {str(p) for p in broken}
    assert "2 corrupt or unreadable file(s) skipped" in caplog.text


def test_corrupt_label_stops_train_net_before_training(custom_set, tmp_path):
    """The config key reaches the data set through DATASETS.CUSTOM; train_net prints one line."""
    from train_helpers import quickstart_opts, run_train_net

    root, broken = custom_set
    opts = quickstart_opts(root, tmp_path / "run", SOLVER__MAX_ITER=2)
    proc = run_train_net(["--config-file", "configs/quickstart.yaml", *opts])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(broken[0]) in error[0] and "iter" not in proc.stderr.split("error:")[0][-200:]


class PoisonWeights(hooks.HookBase):
    """A real NaN loss: at iteration `at`, one weight of the model becomes NaN."""

    def __init__(self, at: int):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            with torch.no_grad():
                next(self.trainer.model.parameters()).view(-1)[0] = float("nan")


def test_nan_loss_names_iteration_and_checkpoint_and_resume_works(tmp_path, capfd):
    data = mini_quickstart(tmp_path / "qs", train=4, val=1)
    cfg = quickstart_cfg(data, tmp_path / "run", SOLVER__MAX_ITER=4, SOLVER__CHECKPOINT_PERIOD=2,
                         SOLVER__IMS_PER_BATCH=2, DATASETS__TEST="()")
    trainer = CATSegTrainer(cfg)
    trainer.register_hooks([PoisonWeights(at=3)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(TrainingDivergedError) as err:
        trainer.train()
    checkpoint = tmp_path / "run" / "model_0000001.pth"
    assert str(err.value) == (
        f"the loss became NaN or infinite at iteration 3 (weights not updated by it); resume from the last "
        f"checkpoint, {checkpoint}, with --resume (lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS if it recurs)")
    logged = capfd.readouterr()
    assert "Traceback" not in logged.out + logged.err and "FloatingPointError" not in logged.out + logged.err
    resumed = CATSegTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    assert resumed.iter == 4 and (tmp_path / "run" / "model_final.pth").is_file()
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
