"""prepare_ade847.py on a miniature ADE20K_2021_17_01: index_ade20k.pkl, *_seg.png colour
encoding, the short-side-512 resize, uint16 TIFF labels."""
import pickle
import sys
from pathlib import Path

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from catseg.data.class_names import load_class_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
import prepare_ade847  # noqa: E402

# (R, G) of a *_seg.png pixel -> expected train id. ADE id = (R // 10) * 256 + G:
# 113,162 -> 2978 (wall, 0); 19,56 -> 312 (building, 1); 10,52 -> 308 (100);
# 125,76 -> 3148 (846); 7,0 -> 0 (unlabeled); 3,5 -> 5 (not a benchmark class);
# 120,128 -> 3200 (beyond every listed id).
RULE = {(113, 162): 0, (19, 56): 1, (10, 52): 100, (125, 76): 846,
        (7, 0): 65535, (3, 5): 65535, (120, 128): 65535}


def make_seg(h, w, rng):
    """(H, W, 3) seg.png drawing every RULE colour in 4x4 blocks, and its expected train ids."""
    keys = list(RULE)
    choice = rng.randint(0, len(keys), size=((h + 3) // 4, (w + 3) // 4))
    choice.flat[: len(keys)] = range(len(keys))
    choice = np.kron(choice, np.ones((4, 4), int))[:h, :w]
    seg = np.zeros((h, w, 3), np.uint8)
    seg[..., 0] = np.array([k[0] for k in keys])[choice]
    seg[..., 1] = np.array([k[1] for k in keys])[choice]
    seg[..., 2] = 9  # instance channel, unused
    return seg, np.array([RULE[k] for k in keys])[choice]


def test_ade847_pixels_resize_and_loading(tmp_path, builtin_root):
    base = tmp_path / "ADE20K_2021_17_01"
    rng = np.random.RandomState(3)
    entries = {  # filename -> (folder, h, w)
        "ADE_val_00000001.jpg": ("ADE20K_2021_17_01/images/ADE/validation/home/bedroom", 12, 16),
        "ADE_val_00000002.jpg": ("ADE20K_2021_17_01/images/ADE/validation/urban/street", 520, 600),
        "ADE_train_00000001.jpg": ("ADE20K_2021_17_01/images/ADE/training/home/bedroom", 8, 8),
    }
    expected = {}
    for name, (folder, h, w) in entries.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / folder / name)
        seg, train_ids = make_seg(h, w, rng)
        Image.fromarray(seg).save(tmp_path / folder / name.replace(".jpg", "_seg.png"))
        expected[name] = train_ids
    with open(base / "index_ade20k.pkl", "wb") as f:
        pickle.dump({"folder": [v[0] for v in entries.values()], "filename": list(entries)}, f)

    assert prepare_ade847.main(["--root", str(tmp_path), "--expected", "2"]) == 0
    labels = base / "annotations_detectron2/validation"
    images = base / "images_detectron2/validation"
    assert sorted(p.name for p in labels.iterdir()) == ["ADE_val_00000001.tif", "ADE_val_00000002.tif"]
    small = Image.open(labels / "ADE_val_00000001.tif")
    assert small.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(small), expected["ADE_val_00000001.jpg"])
    assert Image.open(images / "ADE_val_00000001.jpg").size == (16, 12)
    # short side 520 > 512: resized to 512 x round(600 / 520 * 512) = 512 x 591, labels nearest
    big = np.asarray(Image.open(labels / "ADE_val_00000002.tif"))
    assert big.shape == (512, 591) and Image.open(images / "ADE_val_00000002.jpg").size == (591, 512)
    want = cv2.resize(expected["ADE_val_00000002.jpg"].astype(np.int32), (591, 512),
                      interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(big, want)

    builtin_root(tmp_path)
    records = DatasetCatalog.get("ade20k_full_sem_seg_freq_val_all")
    assert [Path(r["file_name"]).name for r in records] == ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"]
    meta = MetadataCatalog.get("ade20k_full_sem_seg_freq_val_all")
    assert meta.stuff_classes == load_class_names("ade847") and len(meta.stuff_classes) == 847
    assert meta.ignore_label == 65535 and meta.evaluator_type == "sem_seg"


def test_resize_rule():
    assert prepare_ade847.resized_shape(512, 700) is None
    assert prepare_ade847.resized_shape(513, 700) == (512, 699)
    assert prepare_ade847.resized_shape(1000, 600) == (853, 512)


def test_missing_seg_png_named(tmp_path, capsys):
    folder = "ADE20K_2021_17_01/images/ADE/validation/x"
    (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / folder / "ADE_val_00000001.jpg")
    with open(tmp_path / "ADE20K_2021_17_01/index_ade20k.pkl", "wb") as f:
        pickle.dump({"folder": [folder], "filename": ["ADE_val_00000001.jpg"]}, f)
    assert prepare_ade847.main(["--root", str(tmp_path), "--expected", "1"]) == 1
    assert f"{tmp_path / folder}/ADE_val_00000001_seg.png not found" in capsys.readouterr().err
