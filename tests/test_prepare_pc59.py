"""prepare_pc59.py on a miniature trainval_merged.json with RLE masks (pycocotools)."""
import json
import sys
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_utils

from catseg.data.class_names import load_class_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
import prepare_pc59  # noqa: E402

# raw PASCAL-Context id -> expected PC-59 train id (sorted 59-class raw list: 0, 2, 9, 18, ..., 458)
RULE = {0: 255, 2: 0, 9: 1, 18: 2, 454: 57, 458: 58, 1: 255, 3: 255, 459: 255}


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def test_pc59_painting_order_pixels_and_loading(tmp_path, builtin_root):
    voc = tmp_path / "VOCdevkit/VOC2010"
    (voc / "JPEGImages").mkdir(parents=True)
    h, w = 6, 9
    # painted in file order; annotation 2 overlaps 1 and wins; the last row stays 0 (unpainted)
    masks = []
    raw = np.zeros((h, w), int)
    for k, cat in enumerate([2, 9, 18, 454, 458, 1, 3, 459]):
        m = np.zeros((h, w), bool)
        m[:5, k:k + 2] = True
        masks.append((cat, m))
        raw[m] = cat
    images = [{"image_id": 1, "file_name": "2008_000002.jpg", "height": h, "width": w, "phase": "val"},
              {"image_id": 2, "file_name": "2008_000003.jpg", "height": 4, "width": 4, "phase": "train"},
              {"image_id": 3, "file_name": "2008_000007.jpg", "height": 3, "width": 5, "phase": "val"}]
    annos = [{"image_id": 1, "category_id": cat, "segmentation": rle(m)} for cat, m in masks]
    annos.insert(2, {"image_id": 3, "category_id": 9, "segmentation": rle(np.eye(3, 5))})
    annos.append({"image_id": 2, "category_id": 2, "segmentation": rle(np.ones((4, 4)))})
    (voc / "trainval_merged.json").write_text(json.dumps({"images": images, "annos_segmentation": annos}))
    for img in images:
        Image.fromarray(np.zeros((img["height"], img["width"], 3), np.uint8)).save(
            voc / "JPEGImages" / img["file_name"])

    assert prepare_pc59.main(["--root", str(tmp_path), "--expected", "2"]) == 0
    out = voc / "annotations_detectron2/pc59_val"
    assert sorted(p.name for p in out.iterdir()) == ["2008_000002.png", "2008_000007.png"]
    got = np.asarray(Image.open(out / "2008_000002.png"))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.vectorize(RULE.get)(raw))
    assert got[0, 1] == 1 and got[5, 0] == 255  # overlap: the later annotation (raw 9) wins
    want = np.where(np.eye(3, 5, dtype=bool), 1, 255)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "2008_000007.png")), want)

    builtin_root(tmp_path)
    assert len(DatasetCatalog.get("context_59_test_sem_seg")) == 2
    meta = MetadataCatalog.get("context_59_test_sem_seg")
    assert meta.stuff_classes == load_class_names("pc59") and len(meta.stuff_classes) == 59
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
