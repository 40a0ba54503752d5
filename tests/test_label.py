"""catseg-label end to end (issue 24's acceptance), through detectron2's launcher on the CPU:
a folder of 40 images of varied sizes plus 2 corrupt files, the tiny config.

- one process: 40 label PNGs, both corrupt files in failures.jsonl, the summary's counts;
- two processes (gloo), one of them SIGKILLed mid-run, then the same command again: the restart
  labels only what had no record (the summary's network count and the untouched inodes and
  mtimes of finished files say so), leaves no partial file, and its labels are byte-identical to
  the one-process run's (both with --threads 1: the CPU's float results depend on the thread
  count, see catseg/app/label.py);
- the output folder's train.yaml trains (own_data.yaml's quick-start model) for 2 iterations.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VOCAB = "sky; grass, lawn; sea; road"
SIZES = [(64, 96), (96, 64), (80, 80), (64, 128), (128, 72), (72, 100), (100, 100), (64, 64)]


def make_folder(root: Path) -> Path:
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        h, w = SIZES[i % len(SIZES)]
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[: h // 2] = (70, 130, 220)  # some structure: sky above
        Image.fromarray(image).save(folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    (folder / "corrupt_text.jpg").write_bytes(b"this is not an image\n")
    png = (folder / "img001.png").read_bytes()
    (folder / "corrupt_truncated.png").write_bytes(png[: len(png) // 2])
    return folder


def command(folder: Path, out: Path, *extra: str):
    return [sys.executable, str(REPO / "demo" / "label.py"), "--input", str(folder), "--output", str(out),
            "--vocab", VOCAB, "--batch-size", "2", "--threads", "1", *extra]


RUN_MARK = f"catseg-test-label-{os.getpid()}"  # in the environment of every process the tests start


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "CATSEG_TEST_RUN": RUN_MARK}


def our_processes() -> list:
    """Pids of live processes started by these tests (their environment carries RUN_MARK)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if RUN_MARK.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def describe(pid: int) -> str:
    """One line about a process: pid, parent, state and command line (for a failure message)."""
    try:
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} ppid {status.get('PPid')} {status.get('State')}: {cmdline[:200]}"


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=environment(), **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    folder = make_folder(root)
    out = root / "one"
    proc = run(command(folder, out, "--loader-workers", "2", "--overlay", "--save-probs"))
    return folder, out, proc


def outputs(out: Path, kind: str) -> dict:
    return {p.name: p for p in (out / kind).iterdir() if not p.name.startswith(".")}


def test_one_process(reference):
    folder, out, proc = reference
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1: some inputs failed
    assert "Traceback" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (40, 0, 2)
    assert "total (1 processes): 40 done, 0 skipped, 2 failed" in proc.stderr
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["path"]).name for f in failures) == ["corrupt_text.jpg", "corrupt_truncated.png"]
    assert all(f["reason"] and "\n" not in f["reason"] for f in failures)
    assert json.loads((out / "classes.json").read_text()) == ["sky", "grass, lawn", "sea", "road"]
    labels = outputs(out, "labels")
    assert len(labels) == 40
    for i in range(40):
        name = f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        with Image.open(labels[f"img{i:03d}.png"]) as im:
            assert im.mode == "L" and im.size[::-1] == SIZES[i % len(SIZES)]
            assert np.asarray(im).max() < 4
        assert (out / "images" / name).resolve() == (folder / name).resolve()
        record = json.loads((out / "records" / f"img{i:03d}.json").read_text())
        assert record["input"] == str(folder / name) and record["label_map"] == f"labels/img{i:03d}.png"
        probs = np.load(out / "probs" / f"img{i:03d}.npz")
        assert probs["classes"].shape == (3, *SIZES[i % len(SIZES)]) and probs["scores"].dtype == np.float16
        assert np.array_equal(probs["classes"][0], np.asarray(Image.open(labels[f"img{i:03d}.png"])))
        assert (out / "overlays" / f"img{i:03d}.png").is_file()


def test_two_processes_killed_and_restarted(reference, tmp_path):
    folder, one, _ = reference
    out = tmp_path / "two"
    log = tmp_path / "stderr.txt"
    args = command(folder, out, "--num-gpus", "2", "--loader-workers", "1")
    with open(log, "w") as err:
        launcher = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=environment())
        pids, deadline = {}, time.time() + 400
        while time.time() < deadline and launcher.poll() is None:
            text = log.read_text()
            # (no ^: rank 0's progress bar may precede a line without a newline of its own)
            pids = {int(r): int(p) for r, p in re.findall(r"rank (\d+)/2: pid (\d+)$", text, re.M)}
            # finished records only: the folder also holds atomic_write's temporary files
            if len(pids) == 2 and (out / "records").is_dir() and len(list((out / "records").glob("*.json"))) >= 6:
                break
            time.sleep(0.02)
        assert len(pids) == 2 and launcher.poll() is None, log.read_text()[-3000:]
        os.kill(pids[1], signal.SIGKILL)
        assert launcher.wait(timeout=120) == 1
    deadline = time.time() + 30
    while our_processes() and time.time() < deadline:  # the other rank and every loader worker end too
        time.sleep(0.2)
    assert our_processes() == [], [describe(pid) for pid in our_processes()]
    assert "a labelling process stopped" in log.read_text() and "run the same command again" in log.read_text()
    finished = {p.stem for p in (out / "records").iterdir() if p.suffix == ".json"}
    assert 6 <= len(finished) < 40, "the kill came mid-run"
    before = {kind: {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / kind).iterdir()
                     if Path(p.name).stem in finished} for kind in ("labels", "records")}

    proc = run(args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == len(finished)
    assert summary["done"] == 40 - len(finished)  # images through the network in the restart
    assert summary["failed"] == 2 and len(summary["processes"]) == 2
    assert sum(p["done"] for p in summary["processes"]) == summary["done"]
    after = {kind: {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / kind).iterdir()
                    if Path(p.name).stem in finished} for kind in ("labels", "records")}
    assert after == before  # finished images were not written again

    labels, reference_labels = outputs(out, "labels"), outputs(one, "labels")
    assert sorted(labels) == sorted(reference_labels)
    for name, path in labels.items():
        assert path.read_bytes() == reference_labels[name].read_bytes(), name
        with Image.open(path) as im:
            im.load()  # whole, not truncated
    leftovers = [p for kind in ("labels", "records", "images") for p in (out / kind).iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["path"]).name for f in failures) == ["corrupt_text.jpg", "corrupt_truncated.png"]


def test_the_labels_train(reference, tmp_path):
    _, out, _ = reference
    proc = run([sys.executable, str(REPO / "train_net.py"), "--config-file", str(out / "train.yaml"),
                "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(tmp_path / "train")],
               cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (tmp_path / "train" / "model_final.pth").is_file()
    events = [json.loads(line) for line in (tmp_path / "train" / "metrics.json").read_text().splitlines()]
    assert any("total_loss" in e for e in events) and any("sem_seg/mIoU" in e for e in events)
