"""prepare_voc.py on a miniature VOC 2012 + SegmentationClassAug: VOC-20 and VOC-20b outputs."""
import sys
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from catseg.data.class_names import load_class_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
import prepare_voc  # noqa: E402

RULE_20 = {0: 255, 1: 0, 15: 14, 20: 19, 21: 255, 255: 255}  # raw -> VOC-20 train id
RULE_20B = {0: 20, 1: 0, 15: 14, 20: 19, 21: 255, 255: 255}  # raw -> VOC-20b train id


def test_voc_pixels_dropping_and_loading(tmp_path, builtin_root):
    voc = tmp_path / "VOCdevkit/VOC2012"
    for d in ["JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"]:
        (voc / d).mkdir(parents=True)
    rng = np.random.RandomState(2)
    mixed = rng.choice(list(RULE_20), size=(6, 7)).astype(np.uint8)
    mixed.flat[: len(RULE_20)] = list(RULE_20)
    raws = {
        "2007_000033": mixed,
        "2007_000042": np.array([[0, 0, 255], [0, 255, 255]], np.uint8),  # background only
        "2007_000061": np.full((3, 4), 255, np.uint8),  # nothing labelled
    }
    for stem, raw in raws.items():
        Image.fromarray(raw).save(voc / "SegmentationClassAug" / f"{stem}.png")
        Image.fromarray(rng.randint(0, 255, raw.shape + (3,), dtype=np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(voc / "JPEGImages" / "2008_000001.jpg")  # not in val
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(raws) + "\n")

    assert prepare_voc.main(["--root", str(tmp_path), "--expected", "3"]) == 0
    out20, out20b = voc / "annotations_detectron2/val", voc / "annotations_detectron2_bg/val"
    assert sorted(p.stem for p in out20.glob("*.png")) == ["2007_000033"]
    assert sorted(p.stem for p in out20b.glob("*.png")) == ["2007_000033", "2007_000042"]
    for stem in ["2007_000033"]:
        np.testing.assert_array_equal(np.asarray(Image.open(out20 / f"{stem}.png")),
                                      np.vectorize(RULE_20.get)(raws[stem]))
    for stem in ["2007_000033", "2007_000042"]:
        np.testing.assert_array_equal(np.asarray(Image.open(out20b / f"{stem}.png")),
                                      np.vectorize(RULE_20B.get)(raws[stem]))

    builtin_root(tmp_path)
    assert [Path(r["file_name"]).name for r in DatasetCatalog.get("voc_2012_test_sem_seg")] == ["2007_000033.jpg"]
    assert len(DatasetCatalog.get("voc_2012_test_background_sem_seg")) == 2
    voc20 = load_class_names("voc20")
    meta = MetadataCatalog.get("voc_2012_test_sem_seg")
    assert meta.stuff_classes == voc20 and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    meta = MetadataCatalog.get("voc_2012_test_background_sem_seg")
    assert meta.stuff_classes == voc20 + ["background"] and meta.ignore_label == 255
    assert meta.evaluator_type == "sem_seg_background"
    assert meta.prompt_classes == load_class_names("voc20b") and len(meta.prompt_classes) == 59


def test_missing_label_of_a_val_id(tmp_path, capsys):
    voc = tmp_path / "VOCdevkit/VOC2012"
    for d in ["JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"]:
        (voc / d).mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n")
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(voc / "JPEGImages/2007_000033.jpg")
    assert prepare_voc.main(["--root", str(tmp_path), "--expected", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{voc}/SegmentationClassAug/2007_000033.png not found" in err and "SegmentationClassAug" in err
