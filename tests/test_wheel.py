"""The wheel is a working package on its own: `pip wheel .` carries every data file of the source
tree, `catseg-demo` installed from it into a fresh virtualenv segments an image from outside
the repository with its default config (shipped in the package, random CLIP weights), and
`catseg-web` started from it with no arguments serves its page.

Offline: the wheel is built without build isolation and installed without dependencies; the
fresh virtualenv reaches the dependencies through a .pth file naming the site-packages of the
interpreter running the tests. Site-packages named in a .pth file are put on sys.path without
running their own .pth files, so an editable catseg installed there stays invisible.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "README.md", "catseg", "configs")  # what `pip wheel .` reads
CODE_SUFFIXES = (".py", ".pyc")


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def package_data_files(root: Path) -> set:
    """Paths relative to `root`'s parent of the non-code files of package folder `root` (links followed)."""
    found = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.update(str(Path(folder, f).relative_to(root.parent)) for f in files if not f.endswith(CODE_SUFFIXES))
    return found


def venv_site(venv: Path) -> Path:
    """site-packages of the virtualenv `venv`."""
    (site,) = (venv / "lib").glob("python*/site-packages")
    return site


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the build inputs (an in-tree build would leave build/ in the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", tmp / "dist", src])
    (built,) = (tmp / "dist").glob("catseg-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel installed and the test interpreter's dependencies."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", root])
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (venv_site(root) / "catseg-dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    run([sys.executable, "-m", "pip", "--python", root / "bin" / "python", "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", wheel])
    return root


def clean_env(tmp: Path) -> dict:
    """The environment without the repository on PYTHONPATH, text cache under `tmp`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CATSEG_CACHE"] = str(tmp / "cache")
    return env


def test_wheel_carries_every_package_data_file(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = {n for n in zf.namelist() if n.startswith("catseg/") and not n.endswith(CODE_SUFFIXES)}
    expected = package_data_files(REPO / "catseg")
    assert "catseg/configs/tiny.yaml" in expected and "catseg/modeling/clip_configs/catseg-tiny-clip.json" in expected
    assert names == expected


def test_demo_from_the_installed_wheel(venv, tmp_path):
    assert REPO not in tmp_path.parents, "the image and outputs must lie outside the repository"
    env, python = clean_env(tmp_path), venv / "bin" / "python"
    location = run([python, "-c", "import catseg; print(catseg.__file__)"], env=env, cwd=tmp_path).stdout
    assert Path(location.strip()).is_relative_to(venv), location
    image = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    run([venv / "bin" / "catseg-demo", "--input", image, "--output", out, "--vocab", "sky; grass, lawn",
         "--opts", "MODEL.DEVICE", "cpu"], env=env, cwd=tmp_path)
    record = json.loads((out / "photo.json").read_text(encoding="utf-8"))
    assert Path(record["config"]).resolve() == (venv_site(venv) / "catseg" / "configs" / "tiny.yaml").resolve()
    assert record["output_size"] == [48, 64] and [c["name"] for c in record["classes"]] == ["sky", "grass, lawn"]
    assert (out / record["overlay"]).is_file() and (out / record["label_map"]).is_file()



def test_web_page_from_the_installed_wheel(venv, tmp_path):
    """`catseg-web` with no arguments, outside the repository: it finds its default config in the
    installed package and answers its page with HTTP 200 (port from $GRADIO_SERVER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**clean_env(tmp_path), "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = tmp_path / "web.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(venv / "bin" / "catseg-web")], env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline, status = time.time() + 300, None
        while status is None and time.time() < deadline:
            assert proc.poll() is None, f"catseg-web exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                    status = response.status
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        assert status == 200, f"no page within 300 s:\n{log.read_text()}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as response:
            assert "tiny (random weights)" in response.read().decode("utf-8")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
