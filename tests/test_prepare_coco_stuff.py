"""prepare_coco_stuff.py on a miniature COCO-Stuff download; both splits load through DatasetCatalog."""
import sys
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from catseg.data.class_names import load_class_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
import prepare_coco_stuff  # noqa: E402

# raw COCO-Stuff id -> expected train id. 11, 25 and 182 are not COCO-Stuff-171 classes
# (unused thing ids / beyond the last stuff id), 255 is unlabeled.
RULE = {0: 0, 10: 10, 11: 255, 12: 11, 24: 23, 25: 255, 26: 24, 181: 170, 182: 255, 255: 255}


def test_coco_stuff_pixels_and_loading(tmp_path, builtin_root):
    rng = np.random.RandomState(1)
    raws = {}
    for split, stems in {"train2017": ["000000000009", "000000000025"], "val2017": ["000000000139"]}.items():
        for stem in stems:
            (tmp_path / "coco/images" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "coco/annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.randint(0, 255, (5, 6, 3), dtype=np.uint8)).save(
                tmp_path / "coco/images" / split / f"{stem}.jpg")
            raw = rng.choice(list(RULE), size=(5, 6)).astype(np.uint8)
            raw.flat[: len(RULE)] = list(RULE)
            Image.fromarray(raw).save(tmp_path / "coco/annotations" / split / f"{stem}.png")
            raws[split, stem] = raw

    argv = ["--root", str(tmp_path), "--expected", "train2017=2", "val2017=1"]
    assert prepare_coco_stuff.main(argv) == 0
    for (split, stem), raw in raws.items():
        got = np.asarray(Image.open(tmp_path / "coco/annotations_detectron2" / split / f"{stem}.png"))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.vectorize(RULE.get)(raw))

    builtin_root(tmp_path)
    for name, count in [("coco_2017_train_stuff_all_sem_seg", 2), ("coco_2017_test_stuff_all_sem_seg", 1)]:
        assert len(DatasetCatalog.get(name)) == count
        meta = MetadataCatalog.get(name)
        assert meta.stuff_classes == load_class_names("coco") and len(meta.stuff_classes) == 171
        assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"


def test_expected_needs_split_name_with_two_splits(tmp_path, capsys):
    assert prepare_coco_stuff.main(["--root", str(tmp_path), "--expected", "3"]) == 1
    assert "--expected 3: give SPLIT=N, SPLIT one of train2017, val2017" in capsys.readouterr().err
