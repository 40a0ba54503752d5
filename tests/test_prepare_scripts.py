"""Every datasets/prepare_*.py runs as a script: --help works, and a missing download stops
with exit status 1 and one line naming the missing path and where the data comes from."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {  # script -> (first input it checks, relative to the root; text of the source hint)
    "prepare_ade150.py": ("ADEChallengeData2016", "sceneparsing.csail.mit.edu"),
    "prepare_ade847.py": ("ADE20K_2021_17_01", "groups.csail.mit.edu/vision/datasets/ADE20K"),
    "prepare_coco_stuff.py": ("coco/images/train2017", "cocodataset.org"),
    "prepare_pc59.py": ("VOCdevkit/VOC2010/JPEGImages", "trainval_merged.json"),
    "prepare_pc459.py": ("VOCdevkit/VOC2010/JPEGImages", "trainval.tar.gz"),
    "prepare_voc.py": ("VOCdevkit/VOC2012/JPEGImages", "SegmentationClassAug"),
}


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(REPO / "datasets" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_and_missing_input(script, tmp_path):
    done = run(script, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--expected" in done.stdout and "--no-count-check" in done.stdout and "--root" in done.stdout

    done = run(script, "--root", str(tmp_path / "empty"), cwd=tmp_path)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    missing, source = SCRIPTS[script]
    assert len(lines) == 1, done.stderr
    assert f"{tmp_path / 'empty' / missing} not found: " in lines[0] and source in lines[0]
