"""Start-up mistakes through the real command lines (demo CLI and train_net.py, as subprocesses):
exit status 2, one `error: ...` line naming the problem, no traceback; --debug and
CATSEG_DEBUG=1 show it. Plus the config loader's own behaviour (in-process)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catseg.app.predictor import OpenVocabPredictor
from catseg.config import load_config
from catseg.errors import DEBUG_ENV, ConfigError, WeightsError, report_errors

REPO = Path(__file__).resolve().parents[1]
SAMPLE = str(REPO / "demo" / "samples" / "beach.jpg")


def run(args, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def error_line(proc) -> str:
    """The single error line of a failed run (asserting exit status 2 and no traceback)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "corrupt.pth").write_bytes(b"\x80\x04not a checkpoint at all")
    (tmp / "a_file").write_text("a file where a folder is expected")
    return tmp


def mistakes(tmp: Path):
    """(name, config file, overrides, text the error line must contain) per start-up mistake."""
    tiny = "configs/tiny.yaml"
    return [
        ("missing weights", tiny, ["MODEL.WEIGHTS", str(tmp / "none.pth")],
         f"weights file {tmp / 'none.pth'} not found"),
        ("corrupt weights", tiny, ["MODEL.WEIGHTS", str(tmp / "corrupt.pth")],
         f"weights file {tmp / 'corrupt.pth'} is not a readable checkpoint"),
        ("key typo", tiny, ["MODEL.SEM_SEG_HEAD.NUM_LAYER", "2"],
         "unknown config key MODEL.SEM_SEG_HEAD.NUM_LAYER; did you mean MODEL.SEM_SEG_HEAD.NUM_LAYERS"),
        ("missing config", str(tmp / "missing.yaml"), [], f"config file {tmp / 'missing.yaml'} not found"),
    ]


@pytest.mark.parametrize("index", range(4), ids=["missing-weights", "corrupt-weights", "key-typo", "missing-config"])
def test_demo_cli_startup_mistakes(bad_files, index):
    _, config, opts, expected = mistakes(bad_files)[index]
    proc = run(["demo/demo.py", "--config-file", config, "--input", SAMPLE, "--output", str(bad_files / "out"),
                "--vocab", "sky", "--opts", "MODEL.DEVICE", "cpu", *opts])
    assert expected in error_line(proc)


@pytest.mark.parametrize("index", range(4), ids=["missing-weights", "corrupt-weights", "key-typo", "missing-config"])
def test_train_net_startup_mistakes(bad_files, index):
    _, config, opts, expected = mistakes(bad_files)[index]
    proc = run(["train_net.py", "--config-file", config, "--eval-only", "MODEL.DEVICE", "cpu",
                "DATASETS.TEST", "()", "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", "voc20.json",
                "OUTPUT_DIR", str(bad_files / "train_out"), *opts])
    assert expected in error_line(proc)


def test_web_demo_startup_mistake(bad_files):
    proc = run(["demo/app.py", "--config-file", "configs/tiny.yaml", "--weights", str(bad_files / "corrupt.pth"),
                "--port", "1"])  # fails while loading, before binding any port
    assert f"weights file {bad_files / 'corrupt.pth'} is not a readable checkpoint" in error_line(proc)


def test_unwritable_output(bad_files):
    blocked = bad_files / "a_file" / "out"
    proc = run(["demo/demo.py", "--input", SAMPLE, "--output", str(blocked), "--vocab", "sky"])
    assert f"cannot write to output folder {blocked}" in error_line(proc)
    proc = run(["train_net.py", "--config-file", "configs/tiny.yaml", "--eval-only", "DATASETS.TEST", "()",
                "OUTPUT_DIR", str(blocked)])
    assert f"cannot write to output folder {blocked}" in error_line(proc)


def test_train_net_without_config_and_debug_traceback():
    assert "pass --config-file" in error_line(run(["train_net.py"]))
    debug_flag = run(["demo/demo.py", "--debug", "--config-file", "missing.yaml", "--input", SAMPLE, "--output",
                      "unused", "--vocab", "sky"])
    assert debug_flag.returncode != 0 and "Traceback" in debug_flag.stderr and "ConfigError" in debug_flag.stderr


def test_report_errors(monkeypatch, capsys):
    def fail():
        raise ConfigError("config file x.yaml not found")

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        report_errors(fail)
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: config file x.yaml not found\n"
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError):  # CATSEG_DEBUG=1: the exception (and its traceback) goes through
        report_errors(fail)
    assert report_errors(lambda: 5) == 5


def test_train_net_help_is_catseg_own():
    proc = run(["train_net.py", "--help"])
    assert proc.returncode == 0
    assert "configs/quickstart.yaml" in proc.stdout and "Train on your own data" in proc.stdout
    assert "LazyConfig" not in proc.stdout and "--debug" in proc.stdout


# ------------------------------------------------------------------ in-process: the same errors as exceptions

def test_predictor_raises_specific_errors(bad_files):
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        OpenVocabPredictor(str(REPO / "configs" / "tiny.yaml"), weights=str(bad_files / "corrupt.pth"),
                           opts=["MODEL.DEVICE", "cpu"])
    with pytest.raises(ConfigError, match="did you mean MODEL.SEM_SEG_HEAD.NUM_LAYERS"):
        OpenVocabPredictor(str(REPO / "configs" / "tiny.yaml"), opts=["MODEL.SEM_SEG_HEAD.NUM_LAYER", "2"])


def test_key_typo_in_file_and_wrong_value_type(tmp_path):
    (tmp_path / "typo.yaml").write_text("_BASE_: tiny.yaml\nSOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(ConfigError,
                       match=r"typo.yaml: unknown config key SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR\b"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="Type mismatch"):
        load_config(REPO / "configs" / "tiny.yaml", ["SOLVER.MAX_ITER", "'many'"])
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        load_config(REPO / "configs" / "tiny.yaml", ["SOLVER.MAX_ITER"])


def test_copied_config_finds_its_relative_base_anywhere(tmp_path):
    """configs/backbones/tiny/vit.yaml has _BASE_ ../../tiny.yaml: copied elsewhere, the shipped file is used."""
    shutil.copy(REPO / "configs" / "backbones" / "tiny" / "vit.yaml", tmp_path / "vit.yaml")
    copied = load_config(tmp_path / "vit.yaml")
    original = load_config(REPO / "configs" / "backbones" / "tiny" / "vit.yaml")
    assert copied.dump() == original.dump()
    (tmp_path / "own_base.yaml").write_text("SOLVER:\n  MAX_ITER: 7\n")
    (tmp_path / "child.yaml").write_text("_BASE_: own_base.yaml\n")  # beside the file wins
    assert load_config(tmp_path / "child.yaml").SOLVER.MAX_ITER == 7
    (tmp_path / "orphan.yaml").write_text("_BASE_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"_BASE_ nowhere.yaml not found \(looked in"):
        load_config(tmp_path / "orphan.yaml")


def test_device_defaults_to_cuda_when_available_else_cpu(monkeypatch):
    """tiny.yaml does not set MODEL.DEVICE (detectron2's default "cuda")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config(REPO / "configs" / "tiny.yaml").MODEL.DEVICE == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(REPO / "configs" / "tiny.yaml").MODEL.DEVICE == "cuda"
