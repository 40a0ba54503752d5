"""prepare_ade150.py on a miniature ADEChallengeData2016; also the behaviour every prepare
script shares (idempotent re-runs, count check, missing input) and loading through
DatasetCatalog."""
import sys
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from catseg.data.class_names import load_class_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
import prepare_ade150  # noqa: E402

# raw ADE-150 value -> expected train id (0 = unlabeled -> 255)
RULE = {0: 255, 1: 0, 2: 1, 17: 16, 150: 149}


def write_raw(root: Path):
    """Two validation images with labels drawing every value of RULE; returns raw labels."""
    base = root / "ADEChallengeData2016"
    raws = {}
    rng = np.random.RandomState(0)
    for k, (h, w) in enumerate([(6, 8), (5, 7)]):
        stem = f"ADE_val_0000000{k + 1}"
        (base / "images" / "validation").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / "validation").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(
            base / "images" / "validation" / f"{stem}.jpg")
        raw = rng.choice(list(RULE), size=(h, w)).astype(np.uint8)
        raw.flat[: len(RULE)] = list(RULE)
        Image.fromarray(raw).save(base / "annotations" / "validation" / f"{stem}.png")
        raws[stem] = raw
    return raws


def test_ade150_pixels_and_loading(tmp_path, builtin_root):
    raws = write_raw(tmp_path)
    assert prepare_ade150.main(["--root", str(tmp_path), "--expected", "2"]) == 0
    out_dir = tmp_path / "ADEChallengeData2016/annotations_detectron2/validation"
    for stem, raw in raws.items():
        expected = np.vectorize(RULE.get)(raw)
        got = np.asarray(Image.open(out_dir / f"{stem}.png"))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)

    builtin_root(tmp_path)
    records = DatasetCatalog.get("ade20k_150_test_sem_seg")
    assert [Path(r["sem_seg_file_name"]).name for r in records] == [f"{s}.png" for s in raws]
    assert [Path(r["file_name"]).name for r in records] == [f"{s}.jpg" for s in raws]
    meta = MetadataCatalog.get("ade20k_150_test_sem_seg")
    assert meta.stuff_classes == load_class_names("ade150") and len(meta.stuff_classes) == 150
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"


def test_rerun_skips_finished_outputs_and_redoes_missing(tmp_path):
    write_raw(tmp_path)
    argv = ["--root", str(tmp_path), "--expected", "validation=2"]
    assert prepare_ade150.main(argv) == 0
    out_dir = tmp_path / "ADEChallengeData2016/annotations_detectron2/validation"
    kept, removed = sorted(out_dir.glob("*.png"))
    stamp = kept.stat().st_mtime_ns
    removed.unlink()
    assert prepare_ade150.main(argv) == 0
    assert kept.stat().st_mtime_ns == stamp  # not rewritten
    assert removed.exists()
    assert not list(out_dir.glob(".*"))  # no temporary files left


def test_count_mismatch_fails_with_message(tmp_path, capsys):
    write_raw(tmp_path)
    assert prepare_ade150.main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "validation: expected 2000 labels, found 2" in err
    assert prepare_ade150.main(["--root", str(tmp_path), "--no-count-check"]) == 0


def test_missing_input_names_path_and_source(tmp_path, capsys):
    (tmp_path / "ADEChallengeData2016" / "images" / "validation").mkdir(parents=True)
    assert prepare_ade150.main(["--root", str(tmp_path), "--expected", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{tmp_path}/ADEChallengeData2016/annotations/validation not found" in err
    assert "ADEChallengeData2016.zip" in err and "sceneparsing.csail.mit.edu" in err


def test_pure_rule():
    raw = np.array([[0, 1], [150, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(prepare_ade150.convert_ade150(raw), [[255, 0], [149, 254]])
