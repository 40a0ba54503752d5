"""prepare_pc459.py on miniature PASCAL-Context .mat files (scipy.io), 16-bit TIFF output."""
import sys
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from scipy.io import savemat

from catseg.data.class_names import load_class_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
import prepare_pc459  # noqa: E402

RULE = {1: 0, 2: 1, 100: 99, 459: 458, 0: 459}  # LabelMap value -> train id (0 unlabeled -> ignore 459)


def test_pc459_pixels_and_loading(tmp_path, builtin_root):
    voc = tmp_path / "VOCdevkit/VOC2010"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "trainval").mkdir()
    ids = prepare_pc459.val_ids()
    assert len(ids) == 5104 and ids[:3] == ["2008_000002", "2008_000003", "2008_000007"]
    rng = np.random.RandomState(4)
    maps = {}
    for image_id in ids[:2] + ["2008_000008"]:  # 2008_000008 is a training image: not converted
        label_map = rng.choice(list(RULE), size=(5, 7)).astype(np.uint16)
        label_map.flat[: len(RULE)] = list(RULE)
        savemat(voc / "trainval" / f"{image_id}.mat", {"LabelMap": label_map})
        Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        maps[image_id] = label_map
    # ids[2] has an image but no .mat: skipped

    assert prepare_pc459.main(["--root", str(tmp_path), "--expected", "2"]) == 0
    out = voc / "annotations_detectron2/pc459_val"
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.tif" for i in ids[:2]]
    for image_id in ids[:2]:
        im = Image.open(out / f"{image_id}.tif")
        assert im.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(im), np.vectorize(RULE.get)(maps[image_id]))

    builtin_root(tmp_path)
    assert len(DatasetCatalog.get("context_459_test_sem_seg")) == 2
    meta = MetadataCatalog.get("context_459_test_sem_seg")
    assert meta.stuff_classes == load_class_names("pc459") and len(meta.stuff_classes) == 459
    assert meta.ignore_label == 459 and meta.evaluator_type == "sem_seg"
