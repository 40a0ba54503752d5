"""TEST.BF16 (bfloat16 inference, approximate; measured by benchmarks/bf16.py): off by default, and
the --bf16 flags of catseg-demo and catseg-label turn it on. That the network really runs in
bfloat16 under it, and only at inference: tests/test_amp_training.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from PIL import Image

from catseg import add_catseg_config
from catseg.app import cli as demo_cli
from catseg.app import label as label_cli
from catseg.config import load_config, shipped_config

REPO = Path(__file__).resolve().parents[1]


class Stop(Exception):
    """Raised by the stand-ins once they have seen the config overrides."""


@pytest.mark.parametrize("config", ["tiny.yaml", "quickstart.yaml", "vitl_swinb_384.yaml", "cvpr24/vitb_384.yaml"])
def test_fp32_by_default(config):
    cfg = get_cfg()
    add_catseg_config(cfg)
    assert cfg.TEST.BF16 is False
    assert load_config(str(shipped_config(config))).TEST.BF16 is False


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    return str(path)


@pytest.mark.parametrize("flag", [False, True])
def test_demo_bf16_flag(monkeypatch, tmp_path, image, flag):
    seen = {}

    def predictor(config, opts=(), **kwargs):
        seen["bf16"] = load_config(config, opts).TEST.BF16
        raise Stop
    monkeypatch.setattr(demo_cli, "OpenVocabPredictor", predictor)
    args = demo_cli.build_parser().parse_args(["--input", image, "--output", str(tmp_path / "out"), "--vocab", "a"]
                                              + ["--bf16"] * flag)
    with pytest.raises(Stop):
        demo_cli.run(args)
    assert seen["bf16"] is flag


@pytest.mark.parametrize("flag", [False, True])
def test_label_bf16_flag(monkeypatch, tmp_path, image, flag):
    seen = {}

    def fake_load_config(config, opts=()):
        seen["bf16"] = load_config(config, opts).TEST.BF16
        raise Stop
    monkeypatch.setattr(label_cli, "load_config", fake_load_config)
    args = label_cli.build_parser().parse_args(["--input", image, "--output", str(tmp_path / "out"), "--vocab", "a"]
                                               + ["--bf16"] * flag)
    with pytest.raises(Stop):
        label_cli.start(args)
    assert seen["bf16"] is flag


def test_benchmark_statistics():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bf16

    ref = torch.tensor([[[0.9, 0.5]], [[0.1, 0.4995]]])  # (K=2, 1, 2): one clear pixel, one near tie
    other = torch.tensor([[[0.89, 0.499]], [[0.1, 0.5]]])  # the near tie flips
    s = bf16.summarise([bf16.compare(ref, other, [0.001, 0.5])])
    assert s["max_dprob"] == pytest.approx(0.01) and s["agree_pct"] == 50
    assert s["margins"]["0.001"] == {"pixels_pct": 50, "agree_pct": 100}
    assert s["margins"]["0.5"] == {"pixels_pct": 50, "agree_pct": 100}
    assert bf16.summarise([bf16.compare(ref, ref, [0.9])])["margins"]["0.9"]["agree_pct"] is None


def test_benchmark_needs_the_quickstart_model(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bf16.py"), "--skip-real-size",
                           "--quickstart-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: no trained quick-start model in {tmp_path} "
                                                "(model_final.pth or last_checkpoint): run `make demo` first"]
