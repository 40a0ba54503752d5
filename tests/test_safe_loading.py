"""Weight files are never unpickled without restriction: a .pkl or .pth that would run code is
refused with one line naming it, before any of its code runs; official-format files still load
(the .pkl backbones: tests/test_backbone_convert.py; detectron2 checkpoints: tests/test_checkpoint.py)."""
import contextlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from catseg.app import cli as demo_cli
from catseg.errors import WeightsError
from catseg.weights.files import read_checkpoint

REPO = Path(__file__).resolve().parents[1]


class CreatesFile:
    """Unpickling this calls os.system("touch PATH")."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def evil_files(tmp_path):
    """A detectron2-model-zoo-shaped .pkl and a detectron2-checkpoint-shaped .pth, each carrying
    a payload that creates a file when unpickled, and the path that file would have."""
    marker = tmp_path / "created-by-unpickling"
    pkl, pth = tmp_path / "R-101.pkl", tmp_path / "model_final.pth"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros(3), "x": CreatesFile(marker)},
                     "__author__": "torchvision", "matching_heuristics": True}, f)
    torch.save({"model": {"w": torch.zeros(3), "x": CreatesFile(marker)}, "iteration": 1}, pth)
    return pkl, pth, marker


def test_payloads_really_create_the_file(tmp_path):
    """The files are what they claim: plain pickle.load runs the payload."""
    pkl, _, marker = evil_files(tmp_path)
    with open(pkl, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("which", [0, 1])
def test_code_carrying_files_are_refused(tmp_path, which):
    path = evil_files(tmp_path)[which]
    marker = tmp_path / "created-by-unpickling"
    with pytest.raises(WeightsError) as info:
        read_checkpoint(str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"weights file {path} refused: ")
    assert "posix.system" in message  # what the file would have called
    assert not marker.exists()


@pytest.mark.parametrize("which", [0, 1])
def test_demo_refuses_them_with_one_line(tmp_path, which):
    path = evil_files(tmp_path)[which]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        demo_cli.main(["--config-file", str(REPO / "configs" / "tiny.yaml"), "--input", str(REPO / "demo" / "samples"),
                       "--output", str(tmp_path / "out"), "--opts", "MODEL.WEIGHTS", str(path)])
    assert exit_info.value.code == 2
    lines = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    assert lines == [f"error: weights file {path} refused: " + lines[0].split(" refused: ", 1)[1]]
    assert "Traceback" not in stderr.getvalue()
    assert not (tmp_path / "created-by-unpickling").exists()


def test_official_pkl_contents_load(tmp_path):
    """What detectron2 / Swin .pkl files hold: dicts, numpy arrays (any dtype), numbers, strings,
    lists, tuples; also bytes as Python 3 writes them at protocol 2 (through _codecs.encode)."""
    state = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bn.num_batches": np.int64(3),
             "ids": np.arange(4, dtype=np.int64)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"zoo{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": state, "__author__": "third_party", "matching_heuristics": True,
                         "extra": [1, 2.5, "s", (b"raw", None)]}, f, protocol=protocol)
        loaded = read_checkpoint(str(path))
        assert loaded["__author__"] == "third_party" and loaded["extra"] == [1, 2.5, "s", (b"raw", None)]
        assert all(np.array_equal(loaded["model"][k], v) for k, v in state.items())
