"""README "Train on your own data", followed literally (its bash block, run in a temporary folder
with generated data; only SOLVER.MAX_ITER is lowered), and the class-list mistakes: one line
naming both lists, before any model is built. Also the quiet console of the demo CLI."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red square", "green field", "blue sky", "yellow sun"]
COLORS = [(200, 30, 30), (40, 170, 60), (60, 90, 220), (240, 220, 40)]


def readme_own_data_commands() -> str:
    """The bash block of README.md's "Train on your own data" section."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def make_own_data(root: Path, train: int = 8, val: int = 4, size=(96, 128)) -> None:
    """mydata/ in the README's layout: 4 classes as coloured regions, 255 (ignore) on a border."""
    rng = np.random.default_rng(0)
    (root / "mydata").mkdir()
    (root / "mydata" / "classes.json").write_text(json.dumps(CLASSES))
    for split, count in (("train", train), ("val", val)):
        for kind in ("images", "labels"):
            (root / "mydata" / kind / split).mkdir(parents=True)
        for i in range(count):
            h, w = size
            label = np.zeros((h, w), np.uint8)
            label[: h // 2] = 2
            label[h // 2:, w // 2:] = 1
            label[5:20, w - 25:w - 5] = 3
            label[0] = 255
            image = np.array(COLORS, np.uint8)[np.minimum(label, 3)]
            image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "mydata" / "images" / split / f"{split}{i:03d}.png")
            Image.fromarray(label).save(root / "mydata" / "labels" / split / f"{split}{i:03d}.png")


def environment() -> dict:
    """`python` on PATH is this interpreter's environment; catseg imported from this checkout."""
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    make_own_data(root)
    return root


def test_readme_section_as_written(own_data):
    commands = readme_own_data_commands()
    assert "SOLVER.MAX_ITER 400" in commands and "CATSEG=/path/to/catseg" in commands
    script = commands.replace("CATSEG=/path/to/catseg", f"CATSEG={REPO}").replace("SOLVER.MAX_ITER 400",
                                                                                   "SOLVER.MAX_ITER 2")
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=own_data, env=environment(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "device: " in out
    out_dir = own_data / "output" / "mydata"
    assert (out_dir / "model_final.pth").is_file() and (out_dir / "log.txt").is_file()
    metrics = json.loads((out_dir / "metrics_eval.json").read_text())["sem_seg"]
    assert sorted(k[len("IoU-"):] for k in metrics if k.startswith("IoU-")) == sorted(CLASSES)
    demo = out_dir / "demo"
    stems = sorted(p.stem for p in (own_data / "mydata" / "images" / "val").iterdir())
    for stem in stems:
        record = json.loads((demo / f"{stem}.json").read_text())
        assert [c["name"] for c in record["classes"]] == CLASSES
        assert (demo / record["overlay"]).is_file() and (demo / record["label_map"]).is_file()
    log = (out_dir / "log.txt").read_text()
    assert "Model:\n" in log and "Model:\n" not in out  # the model printout goes to the log file only
    assert "\x1b[" not in out  # no colour codes when redirected


def write_config(folder: Path, name: str, replace: dict) -> str:
    text = (REPO / "configs" / "own_data.yaml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    (folder / name).write_text(text)
    return name


@pytest.mark.parametrize("mistake", ["train list left out", "test list differs", "dataset list differs"])
def test_class_list_mistakes_are_one_line(own_data, mistake):
    (own_data / "three.json").write_text(json.dumps(CLASSES[:3]))
    replace = {
        # left out: the base's (quick-start) list is inherited, and is not the dataset's
        "train list left out": {'    TRAIN_CLASS_JSON: ""': ""},
        "test list differs": {'TEST_CLASS_JSON: ""': 'TEST_CLASS_JSON: "voc20.json"'},
        "dataset list differs": {'TRAIN_CLASS_JSON: ""': 'TRAIN_CLASS_JSON: "three.json"'},
    }[mistake]
    config = write_config(own_data, f"{mistake.replace(' ', '_')}.yaml", replace)
    proc = subprocess.run([sys.executable, str(REPO / "train_net.py"), "--config-file", config], cwd=own_data,
                          env=environment(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "iter:" not in out and "Model" not in out
    expected = {"train list left out": "datasets/quickstart/classes.json",
                "test list differs": "voc20.json (20 classes",
                "dataset list differs": "three.json (3 classes"}[mistake]
    assert expected in errors[0] and "mydata/classes.json (4 classes: red square" in errors[0]


def test_label_ids_out_of_range_before_training(own_data, tmp_path):
    label = own_data / "mydata" / "labels" / "train" / "train000.png"
    original = label.read_bytes()
    ids = np.asarray(Image.open(label)).copy()
    ids[10, 10] = 9
    Image.fromarray(ids).save(label)
    try:
        proc = subprocess.run([sys.executable, str(REPO / "train_net.py"), "--config-file",
                               write_config(own_data, "ok.yaml", {}), "OUTPUT_DIR", str(tmp_path)], cwd=own_data,
                              env=environment(), capture_output=True, text=True, timeout=300)
    finally:
        label.write_bytes(original)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and "Model" not in out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "train000.png has [9]" in errors[0]


def test_demo_cli_stderr_has_no_warnings(tmp_path):
    """A normal demo run: our lines and the progress bar only, no dependency warnings."""
    proc = subprocess.run([sys.executable, str(REPO / "demo" / "demo.py"), "--input",
                           str(REPO / "demo" / "samples" / "beach.jpg"), "--output", str(tmp_path), "--vocab",
                           "sky; sand; sea"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [line for line in proc.stderr.splitlines() if re.search(r"warn|deprecat|No pretrained weights", line, re.I)]
    assert noisy == []
    assert "device: " in proc.stderr and "1 of 1 images segmented" in proc.stderr
