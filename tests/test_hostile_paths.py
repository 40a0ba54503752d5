"""File names from someone else's folders: outputs never leave the output folder (`..`,
separators, absolute paths, symlinks at the target), a symlink loop does not hang, names that
are not UTF-8 or too long are processed, never a crash (catseg/app/outputs.py, cli.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catseg.app.outputs import STEM_BYTES, display_path, output_path, output_stems, safe_stem
from catseg.errors import OutputError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "demo" / "samples" / "beach.jpg"
BAD_BYTES = os.fsdecode(b"caf\xe9-latin1")  # not UTF-8: "\udce9" in the str


@pytest.mark.parametrize("name, stem", [
    ("photo.jpg", "photo"),
    ("..jpg", "image"),  # stem "."
    ("...jpg", "image"),  # stem ".."
    ("a\\..\\..\\evil.png", "a_.._.._evil"),  # a Windows-style path is one Linux file name
    ("tab\there\n.png", "tab_here_"),
    (BAD_BYTES + ".png", "caf\ufffd-latin1"),
])
def test_safe_stem(name, stem):
    assert safe_stem(Path("folder") / name) == stem
    assert output_path(Path("out"), stem + "_labels.png").parent == Path("out")


def test_long_names_cut_below_the_file_name_limit():
    stem = safe_stem(Path("é" * 127 + ".png"))  # 254 bytes
    assert len(stem.encode()) <= STEM_BYTES and (stem + "_overlay.png").encode().__len__() <= 255
    assert output_stems([Path("a/" + "x" * 250 + ".png"), Path("b/" + "x" * 251 + ".png")]) == \
        ["x" * STEM_BYTES, "x" * STEM_BYTES + "_2"]


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "a/b.png", "..", "", "x\x00.png"])
def test_output_path_refuses_names_leaving_the_folder(tmp_path, name):
    with pytest.raises(OutputError, match="would leave the output folder"):
        output_path(tmp_path, name)


def test_symlink_loops_in_input_folder_do_not_hang(tmp_path):
    """Three links back to the folder: a `**` that followed them would branch 3^40 ways (glob.glob
    does); run in a child with a timeout so that a regression fails instead of hanging."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(SAMPLE, folder / "a.jpg")
    for link in ("sub/back", "sub/back2", "back3"):
        (folder / link).symlink_to(folder)  # directory loops
    (folder / "self.png").symlink_to(folder / "self.png")  # a file loop (ELOOP)
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")  # dangling
    child = ("import sys; from catseg.app.cli import expand_inputs; "
             "print(expand_inputs(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", child, str(folder), str(folder / "**" / "*.jpg"), "in/*.jpg"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == repr(([folder / "a.jpg", Path("in/a.jpg")], [])), proc.stdout


def run_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env.pop("PYTHONIOENCODING", None)
    return subprocess.run([sys.executable, "-m", "catseg.app.cli", *args], capture_output=True, timeout=300,
                          cwd=cwd, env=env)


def test_cli_on_hostile_names_stays_inside_the_output_folder(tmp_path):
    """Non-UTF-8, over-long and dot names, a symlink planted at an output target: every image is
    segmented, every output lands in the output folder, the planted link's target is untouched,
    stdout and the JSON are valid UTF-8."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    names = [os.fsencode(BAD_BYTES + ".jpg"), ("é" * 120 + ".jpg").encode(), b"..jpg", b"photo.jpg"]
    for name in names:
        shutil.copy(SAMPLE, os.path.join(os.fsencode(inputs), name))
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    (out / "photo_labels.png").symlink_to(victim)
    proc = run_cli(["--input", str(inputs), "--output", str(out), "--vocab", "sky; sand",
                    "--opts", "MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR", str(tmp_path / "c")], REPO)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    stdout = proc.stdout.decode("utf-8")  # strict: no surrogates leaked
    assert "caf\\xe9-latin1.jpg" in stdout
    assert victim.read_bytes() == b"keep me" and not (out / "photo_labels.png").is_symlink()
    records = [json.loads(p.read_bytes().decode("utf-8")) for p in out.glob("*.json")]
    assert len(records) == len(names)
    for record in records:
        for key in ("label_map", "overlay"):
            assert (out / record[key]).is_file() and Path(record[key]).name == record[key]
    assert sorted(os.listdir(out)) == sorted(os.listdir(out))  # every name listed is inside out/
    assert all(p.resolve().parent == out.resolve() for p in out.iterdir())
    assert {r["input"] for r in records} >= {display_path(inputs / BAD_BYTES) + ".jpg"}
