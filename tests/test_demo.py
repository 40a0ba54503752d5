"""catseg-demo end to end on the bundled samples (tiny config), its JSON schema, legend and failures."""
import contextlib
import io
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catseg.app import cli as demo_cli
from catseg.app.overlay import render_overlay
from catseg.app.predictor import Segmentation
from catseg.palette import class_colors

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (REPO / "demo" / "samples").iterdir() if p.suffix in (".png", ".jpg"))
VOCAB = "sky; grass, lawn; house, building; sun; Sky; café"  # "Sky" repeats "sky"
CLASSES = ["sky", "grass, lawn", "house, building", "sun", "café"]


def validate_record(record: dict, out: Path, num_classes: int):
    """The documented JSON schema (catseg/app/outputs.py, demo/README.md), and its files."""
    assert set(record) == {"schema", "input", "image_size", "output_size", "classes", "present", "label_map",
                           "label_dtype", "overlay", "config", "weights"}
    assert record["schema"] == "catseg-demo/1"
    assert [c["id"] for c in record["classes"]] == list(range(num_classes))
    shares = [c["pixel_share"] for c in record["classes"]]
    assert abs(sum(shares) - 1) < 1e-4 and min(shares) >= 0
    labels = np.asarray(Image.open(out / record["label_map"]))
    assert labels.dtype.name == record["label_dtype"] and list(labels.shape) == record["output_size"]
    counts = np.bincount(labels.ravel(), minlength=num_classes) / labels.size
    assert np.allclose(counts, shares, atol=1e-6)
    present = [i for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    assert record["present"] == present
    return labels


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run over a folder with the samples plus a corrupt and a non-image file."""
    tmp = tmp_path_factory.mktemp("demo")
    inputs = tmp / "inputs"
    inputs.mkdir()
    for p in SAMPLES:
        shutil.copy(p, inputs)
    (inputs / "broken.jpg").write_bytes((REPO / "demo" / "samples" / "beach.jpg").read_bytes()[:300])  # truncated
    (inputs / "readme.png").write_text("not an image")
    (inputs / "ignored.txt").write_text("not an image extension: not picked up from a folder")
    out = tmp / "out"
    argv = ["--input", str(inputs), str(tmp / "missing-*.png"), "--output", str(out), "--vocab", VOCAB,
            "--batch-size", "2", "--opts", "MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR", str(tmp / "c")]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = demo_cli.main(argv)
    return code, out, stdout.getvalue(), stderr.getvalue()


def test_exit_code_and_reports(demo_run):
    code, _, stdout, stderr = demo_run
    assert code == 1  # two bad files and one unmatched pattern
    assert "RANDOM weights" in stderr  # no --config-file: loud notice
    assert "WARNING: duplicate class names removed (first kept): 'sky' x2" in stderr
    assert "broken.jpg: corrupt or truncated image" in stderr and "readme.png: not an image" in stderr
    assert "missing-*.png: no file or folder matches" in stderr
    assert "4 of 6 images segmented" in stderr and "3 failed" in stderr
    assert "img/s" in stderr  # the progress bar
    lines = stdout.strip().splitlines()
    assert len(lines) == len(SAMPLES)  # one summary line per image
    assert all(" classes: " in line and line.endswith(" s)") for line in lines)


def test_all_outputs_written(demo_run):
    _, out, _, _ = demo_run
    for sample in SAMPLES:
        for suffix in ("_overlay.png", "_labels.png", ".json"):
            assert (out / f"{sample.stem}{suffix}").is_file()
    assert not list(out.glob("broken*")) and not list(out.glob("readme*")) and not list(out.glob("ignored*"))


def test_json_schema_and_label_maps(demo_run):
    _, out, _, _ = demo_run
    for sample in SAMPLES:
        record = json.loads((out / f"{sample.stem}.json").read_text(encoding="utf-8"))
        assert [c["name"] for c in record["classes"]] == CLASSES
        h, w = Image.open(sample).size[::-1]
        assert record["image_size"] == record["output_size"] == [h, w]
        assert record["label_dtype"] == "uint8" and record["config"].endswith("tiny.yaml")
        validate_record(record, out, len(CLASSES))


def test_overlay_legend_lists_exactly_the_classes_present(demo_run):
    _, out, _, _ = demo_run
    for sample in SAMPLES:
        record = json.loads((out / f"{sample.stem}.json").read_text(encoding="utf-8"))
        labels = np.asarray(Image.open(out / record["label_map"])).astype(np.int64)
        image = np.asarray(Image.open(sample).convert("RGB"))
        shares = [c["pixel_share"] for c in record["classes"]]
        expected, legend = render_overlay(image, labels, CLASSES, record["present"], shares)
        written = Image.open(out / record["overlay"]).convert("RGB")
        assert [i for i, _ in legend] == record["present"] == sorted(np.unique(labels), key=lambda i: -shares[i])
        colors = class_colors(len(CLASSES))
        pixels = np.asarray(written)
        for i, (x0, y0, x1, y1) in legend:  # each swatch in the written file has its class colour
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == tuple(colors[i])
        below = pixels[legend[-1][1][3] + 4:, labels.shape[1]:]  # nothing drawn under the last entry
        assert below.size == 0 or (below == 255).all()
        assert written.size == expected.size


def test_label_map_is_uint16_over_255_classes(tmp_path):
    classes = [f"class {i}" for i in range(300)]
    labels = torch.tensor([[0, 299], [299, 256]])
    result = Segmentation(labels=labels, probs=torch.zeros(300, 2, 2), classes=classes,
                          image=np.zeros((2, 2, 3), np.uint8), image_size=(2, 2))
    record = demo_cli.write_outputs(result, Path("x.png"), tmp_path, "x", "cfg.yaml", "")
    assert record["label_dtype"] == "uint16"
    stored = validate_record(record, tmp_path, 300)
    assert stored.tolist() == [[0, 299], [299, 256]] and record["present"] == [299, 0, 256]


def test_output_stems_are_distinct():
    assert demo_cli.output_stems([Path("a/x.png"), Path("b/x.jpg"), Path("x_2.png"), Path("c/x.png")]) == \
        ["x", "x_2", "x_2_2", "x_3"]


def test_usage_errors_exit_before_building_a_model(tmp_path, capsys):
    img = str(SAMPLES[0])
    assert demo_cli.main(["--input", img, "--output", str(tmp_path), "--vocab", " ; , ;"]) == 2
    assert "empty vocabulary" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert demo_cli.main(["--input", img, "--output", str(tmp_path), "--vocab-file", str(empty)]) == 2
    assert "empty vocabulary" in capsys.readouterr().err
    assert demo_cli.main(["--input", str(tmp_path / "none*.jpg"), "--output", str(tmp_path), "--vocab", "a"]) == 1
    err = capsys.readouterr().err
    assert "no file or folder matches" in err and "no input images found" in err
    with pytest.raises(SystemExit) as e:
        demo_cli.main(["--input", img, "--output", str(tmp_path), "--vocab", "a", "--dataset-vocab", "ade150"])
    assert e.value.code == 2


def test_vocabulary_sources(tmp_path):
    as_json = tmp_path / "v.json"
    as_json.write_text(json.dumps(["cat, kitten", "dog", "cat, kitten"]))
    as_txt = tmp_path / "v.txt"
    as_txt.write_text("cat, kitten\n\ndog\n")
    args = demo_cli.build_parser().parse_args
    with pytest.warns(UserWarning, match="duplicate"):
        assert demo_cli.choose_vocabulary(args(["--input", "x", "--output", "o", "--vocab-file", str(as_json)])) \
            == ["cat, kitten", "dog"]
    assert demo_cli.choose_vocabulary(args(["--input", "x", "--output", "o", "--vocab-file", str(as_txt)])) \
        == ["cat, kitten", "dog"]
    assert demo_cli.choose_vocabulary(args(["--input", "x", "--output", "o", "--vocab", "cat,kitten ;  dog"])) \
        == ["cat, kitten", "dog"]
    assert len(demo_cli.choose_vocabulary(args(["--input", "x", "--output", "o", "--dataset-vocab", "ade150"]))) == 150


def test_demo_script_wrapper(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["demo.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "demo" / "demo.py"), run_name="__main__")
    assert e.value.code == 0
    assert "--dataset-vocab" in capsys.readouterr().out
