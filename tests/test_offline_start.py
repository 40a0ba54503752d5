"""No needless CLIP download: with a full local checkpoint (it holds CLIP's tensors), configs whose
CLIP_WEIGHTS is "pretrained" start and segment with no network (HF_HUB_OFFLINE=1, HF_ENDPOINT at a
closed port); where the CLIP weights are really needed and cannot be had, one line says which file
and how to give it."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from catseg.app.predictor import OpenVocabPredictor
from catseg.config import load_config

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "demo" / "samples" / "beach.jpg"
VOCAB = ["sky", "sea", "sand"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"),
               CATSEG_CACHE=str(tmp_path / "text-cache"))
    return env


def demo(opts, env, out, config="tiny.yaml"):
    cmd = [sys.executable, "-m", "catseg.app.cli", "--config-file", str(REPO / "configs" / config), "--input",
           str(IMAGE), "--output", str(out), "--vocab", "; ".join(VOCAB), "--opts", "MODEL.DEVICE", "cpu", *opts]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config", ["tiny.yaml", "cvpr24/tiny_b.yaml"])
def test_full_checkpoint_starts_offline_with_pretrained_clip(tmp_path, config):
    """The tiny v1 / CVPR'24 configs name an official CLIP ("ViT-B/16", tag "openai") over a shipped
    tiny architecture, for which open_clip has no pretrained weights: asking open_clip for them
    fails. With CLIP_WEIGHTS "pretrained" and a full checkpoint, CLIP is not asked for: the demo
    runs offline and gives the checkpoint's segmentation."""
    torch.manual_seed(5)
    model = build_model(load_config(str(REPO / "configs" / config), ["MODEL.DEVICE", "cpu"]))
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 10}, ckpt)
    run = demo(["MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "pretrained", "MODEL.WEIGHTS", str(ckpt)], offline_env(tmp_path),
               tmp_path / "out", config)
    assert run.returncode == 0, run.stderr
    expected = OpenVocabPredictor(str(REPO / "configs" / config), weights=str(ckpt),
                                  opts=["MODEL.DEVICE", "cpu"]).predict(str(IMAGE), VOCAB)
    labels = np.asarray(Image.open(tmp_path / "out" / f"{IMAGE.stem}_labels.png"))
    assert np.array_equal(labels, expected.labels.numpy())

    without = demo(["MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "pretrained"], offline_env(tmp_path), tmp_path / "out2", config)
    assert without.returncode == 2 and "Traceback" not in without.stderr
    error = without.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot get the CLIP weights ") and "set MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS" in error


def test_unobtainable_clip_weights_name_the_file(tmp_path):
    """A real open_clip architecture and tag (ViT-B/16, openai) offline and not cached: one line
    naming the hub file open_clip would download, and CLIP_WEIGHTS as the way to give it."""
    run = demo(["MODEL.SEM_SEG_HEAD.CLIP_MODEL", "", "MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "pretrained"],
               offline_env(tmp_path), tmp_path / "out")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: cannot get the CLIP weights https://huggingface.co/timm/vit_base_patch16_clip_224.openai "
        "(RuntimeError): download them and set MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS to the file's path, or give "
        "MODEL.WEIGHTS a full CAT-Seg checkpoint (it holds CLIP)")
