"""Released models by name and hub weights, end to end: catseg-demo against a local stand-in of the
Hugging Face hub (tests/hub_server.py, HF_ENDPOINT), through the real huggingface_hub client."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_model
from hub_server import HubStandIn
from PIL import Image

from catseg.app.predictor import OpenVocabPredictor
from catseg.weights.hub import HubFile, parse_hub_name
from catseg.weights.models import RELEASED_MODELS, format_model_table, released_model

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "demo" / "samples" / "shapes.png"
VOCAB = "sky; grass; house"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny CAT-Seg v1 checkpoint saved as detectron2 saves one: (path, bytes). At 18 MB it is
    over one download chunk of huggingface_hub (10 MB), so an interrupted download keeps some."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": make_model("tiny.yaml", seed=7).state_dict(), "iteration": 99}, path)
    return path, path.read_bytes()


def hub_env(tmp_path, endpoint, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1",
               CATSEG_CACHE=str(tmp_path / "text-cache"), **extra)
    return env


def demo(args, env, out):
    """catseg-demo (its main, run as a module so this checkout's catseg is used) on one image."""
    cmd = [sys.executable, "-m", "catseg.app.cli", "--input", str(IMAGE), "--output", str(out), "--vocab", VOCAB,
           *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def labels(out):
    return np.asarray(Image.open(out / f"{IMAGE.stem}_labels.png"))


def test_hub_names_parse():
    assert parse_hub_name("hf://spaces/hamacojr/CAT-Seg-weights/model_large.pth") == HubFile(
        "hamacojr/CAT-Seg-weights", "model_large.pth", "space")
    assert parse_hub_name("hf://hamacojr/CAT-Seg/model_final_huge.pth") == HubFile("hamacojr/CAT-Seg",
                                                                                    "model_final_huge.pth")
    assert parse_hub_name("https://huggingface.co/hamacojr/CAT-Seg/blob/main/model_final_large.pth") == HubFile(
        "hamacojr/CAT-Seg", "model_final_large.pth")
    assert parse_hub_name("https://huggingface.co/spaces/hamacojr/CAT-Seg-weights/resolve/main/model_base.pth") == \
        HubFile("hamacojr/CAT-Seg-weights", "model_base.pth", "space")
    assert parse_hub_name("hf://a/b@v2/sub/dir/w.safetensors") == HubFile("a/b", "sub/dir/w.safetensors", revision="v2")
    assert parse_hub_name("model_final_large.pth") is None and parse_hub_name("/abs/model.pth") is None


def test_released_model_table():
    assert {n: (m.config, m.weights) for n, m in RELEASED_MODELS.items()} == {
        "cvpr24-base": ("cvpr24/vitb_384.yaml", "hf://spaces/hamacojr/CAT-Seg-weights/model_base.pth"),
        "cvpr24-large": ("cvpr24/vitl_336.yaml", "hf://spaces/hamacojr/CAT-Seg-weights/model_large.pth"),
        "v1-base": ("vitb_r101_384.yaml", "hf://hamacojr/CAT-Seg/model_final_base.pth"),
        "v1-large": ("vitl_swinb_384.yaml", "hf://hamacojr/CAT-Seg/model_final_large.pth"),
        "v1-huge": ("vith_swinb_384.yaml", "hf://hamacojr/CAT-Seg/model_final_huge.pth"),
        "v1-giant": ("vitg_swinb_384.yaml", "hf://hamacojr/CAT-Seg/model_final_giant.pth")}
    for model in RELEASED_MODELS.values():
        assert Path(model.config_path()).is_file()
    table = format_model_table()
    assert "cvpr24-large  16.0   23.8    37.9   63.3   97.0    82.5" in table  # README's published numbers


def test_train_net_model_picks_config_and_weights(monkeypatch):
    sys.path.insert(0, str(REPO))
    import train_net

    args = train_net.build_parser().parse_args(["--model", "v1-large", "--eval-only", "SOLVER.MAX_ITER", "1"])
    train_net.apply_model(args)
    assert args.config_file == released_model("v1-large").config_path()
    assert args.opts == ["MODEL.WEIGHTS", "hf://hamacojr/CAT-Seg/model_final_large.pth", "SOLVER.MAX_ITER", "1"]


def test_model_by_name_downloads_then_runs_offline(tmp_path, tiny_checkpoint):
    """--model NAME (the table extended through $CATSEG_MODELS with a tiny model in a space): the
    first run downloads with a progress bar; with the stand-in stopped and HF_HUB_OFFLINE=1 the
    second run takes the file from the cache; both segment with the checkpoint's weights."""
    path, data = tiny_checkpoint
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"tiny-test": {"config": "tiny.yaml",
                                                "weights": "hf://spaces/catseg-test/weights/tiny.pth"}}))
    with HubStandIn({("spaces/catseg-test/weights", "tiny.pth"): data}) as hub:
        env = hub_env(tmp_path, hub.endpoint, CATSEG_MODELS=str(models))
        first = demo(["--model", "tiny-test"], env, tmp_path / "out1")
    assert first.returncode == 0, first.stderr
    assert ("GET", "/spaces/catseg-test/weights/resolve/main/tiny.pth", "") in hub.requests
    assert "tiny.pth: 100%" in first.stderr  # huggingface_hub's progress bar
    cached = list((tmp_path / "hf" / "hub").glob("spaces--catseg-test--weights/snapshots/*/tiny.pth"))
    assert len(cached) == 1 and cached[0].read_bytes() == data

    offline = demo(["--model", "tiny-test"], {**env, "HF_HUB_OFFLINE": "1"}, tmp_path / "out2")
    assert offline.returncode == 0, offline.stderr
    assert "tiny.pth: 100%" not in offline.stderr
    predictor = OpenVocabPredictor(str(REPO / "configs" / "tiny.yaml"), weights=str(path), opts=["MODEL.DEVICE", "cpu"])
    expected = predictor.predict(str(IMAGE), [c.strip() for c in VOCAB.split(";")])
    assert np.array_equal(labels(tmp_path / "out1"), expected.labels.numpy())
    assert np.array_equal(labels(tmp_path / "out2"), expected.labels.numpy())


def test_hub_link_resumes_interrupted_download_and_missing_file_is_one_line(tmp_path, tiny_checkpoint):
    """MODEL.WEIGHTS as the official README writes links (huggingface.co/.../blob/main/FILE, served
    by HF_ENDPOINT): the first response is cut midway, the client resumes with a Range request and
    the cached file is whole. A file the hub does not have: one line naming its URL, exit 2."""
    _, data = tiny_checkpoint
    with HubStandIn({("catseg-test/models", "tiny.pth"): data}, cut_first_get=True) as hub:
        env = hub_env(tmp_path, hub.endpoint)
        run = demo(["--config-file", str(REPO / "configs" / "tiny.yaml"), "--opts", "MODEL.WEIGHTS",
                    "https://huggingface.co/catseg-test/models/blob/main/tiny.pth"], env, tmp_path / "out")
        missing = demo(["--config-file", str(REPO / "configs" / "tiny.yaml"), "--opts", "MODEL.WEIGHTS",
                        "hf://catseg-test/models/missing.pth"], env, tmp_path / "out_missing")
    assert run.returncode == 0, run.stderr
    gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith("/tiny.pth")]
    assert len(gets) == 2 and gets[0][2] == ""
    resumed_at = int(gets[1][2].removeprefix("bytes=").removesuffix("-"))  # "bytes=N-": what it had kept
    assert 0 < resumed_at <= HubStandIn.cut_at(data)
    cached = list((tmp_path / "hf" / "hub").glob("models--catseg-test--models/snapshots/*/tiny.pth"))
    assert len(cached) == 1 and hashlib.sha256(cached[0].read_bytes()).digest() == hashlib.sha256(data).digest()
    assert (tmp_path / "out" / f"{IMAGE.stem}_labels.png").is_file()

    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: weights file {hub.endpoint}/catseg-test/models/resolve/main/missing.pth not found on the hub "
        "(MODEL.WEIGHTS)")
    assert "Traceback" not in missing.stderr


def test_web_and_demo_take_model_names(capsys):
    from catseg.app import cli, web

    models, random_weights = web.model_choices([], [], ["cvpr24-large", "v1-giant"])
    assert not random_weights and models == {
        "cvpr24-large": (released_model("cvpr24-large").config_path(),
                         "hf://spaces/hamacojr/CAT-Seg-weights/model_large.pth"),
        "v1-giant": (released_model("v1-giant").config_path(), "hf://hamacojr/CAT-Seg/model_final_giant.pth")}
    assert web.main(["--list-models"]) == 0 and cli.main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert out.count("v1-huge ") == 2 and out.count("hf://hamacojr/CAT-Seg/model_final_huge.pth") == 2
