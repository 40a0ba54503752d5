"""Custom folder datasets: registration by call and by DATASETS.CUSTOM, and every bad-data
case with its message (skipped: image without label, label without image, size mismatch;
fatal: ids outside the class list, nothing usable)."""
import json
import logging

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from catseg.config import add_catseg_config
from catseg.data.datasets import (
    DatasetError,
    DatasetNotFoundError,
    check_dataset_exists,
    parse_custom_spec,
    register_custom_dataset,
    register_from_config,
)


@pytest.fixture
def folder(tmp_path):
    """images/ and labels/ with two good pairs, and classes.json with 3 classes."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "sky, heaven", "road"]))
    for stem, value in [("a", 0), ("b", 2)]:
        add_pair(tmp_path, stem, np.full((4, 6), value, np.uint8))
    return tmp_path


def add_pair(root, stem, label, image_shape=None, image_ext=".jpg"):
    shape = label.shape if image_shape is None else image_shape
    Image.fromarray(np.zeros(shape + (3,), np.uint8)).save(root / "images" / f"{stem}{image_ext}")
    Image.fromarray(label).save(root / "labels" / f"{stem}.png")


def register(folder, name, **kw):
    register_custom_dataset(name, folder / "images", folder / "labels", folder / "classes.json", **kw)


def test_register_and_load(folder, registered_datasets):
    registered_datasets("mine")
    register(folder, "mine")
    records = DatasetCatalog.get("mine")
    assert [r["sem_seg_file_name"] for r in records] == [str(folder / "labels" / f"{s}.png") for s in "ab"]
    assert [r["file_name"] for r in records] == [str(folder / "images" / f"{s}.jpg") for s in "ab"]
    assert records[0]["height"] == 4 and records[0]["width"] == 6
    meta = MetadataCatalog.get("mine")
    assert meta.stuff_classes == ["cat", "sky, heaven", "road"] == meta.prompt_classes
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert meta.class_list == str(folder / "classes.json")
    register(folder, "mine", ignore_label=0)  # registering again replaces
    assert MetadataCatalog.get("mine").ignore_label == 0


def test_register_from_config(folder, registered_datasets):
    cfg = get_cfg()
    add_catseg_config(cfg)
    cfg.DATASETS.CUSTOM = [f"cfg_a:{folder}/images:{folder}/labels:{folder}/classes.json",
                           f"cfg_b:{folder}/images:{folder}/labels:{folder}/classes.json:7"]
    registered_datasets("cfg_a")
    registered_datasets("cfg_b")
    assert register_from_config(cfg) == ["cfg_a", "cfg_b"]
    assert len(DatasetCatalog.get("cfg_a")) == 2
    assert MetadataCatalog.get("cfg_a").ignore_label == 255
    assert MetadataCatalog.get("cfg_b").ignore_label == 7
    assert register_from_config(cfg) == ["cfg_a", "cfg_b"]  # idempotent


def test_bad_config_entry():
    with pytest.raises(ValueError, match="expected 'name:image_dir:label_dir:classes.json'"):
        parse_custom_spec("only:two")
    with pytest.raises(ValueError, match="ignore value 'x' is not a non-negative integer"):
        parse_custom_spec("n:i:l:c.json:x")


def test_image_without_label_is_skipped_with_warning(folder, registered_datasets, caplog):
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(folder / "images" / "lonely.jpg")
    registered_datasets("unlabeled")
    register(folder, "unlabeled")
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get("unlabeled")
    assert len(records) == 2
    assert f"1 image(s) in {folder / 'images'} have no label in {folder / 'labels'}, skipped: lonely.jpg" in caplog.text


def test_label_without_image_is_skipped_with_warning(folder, registered_datasets, caplog):
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(folder / "labels" / "orphan.png")
    registered_datasets("orphan")
    register(folder, "orphan")
    with caplog.at_level(logging.WARNING):
        assert len(DatasetCatalog.get("orphan")) == 2
    assert f"1 label(s) in {folder / 'labels'} have no image in {folder / 'images'}, skipped: orphan.png" in caplog.text


def test_size_mismatch_is_skipped_with_warning(folder, registered_datasets, caplog):
    add_pair(folder, "c", np.zeros((4, 6), np.uint8), image_shape=(5, 6), image_ext=".png")
    registered_datasets("sizes")
    register(folder, "sizes")
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get("sizes")
    assert [r["file_name"].rsplit("/", 1)[1] for r in records] == ["a.jpg", "b.jpg"]
    assert (f"label {folder / 'labels' / 'c.png'} is 4x6 (h x w) but image {folder / 'images' / 'c.png'} "
            "is 5x6; skipped") in caplog.text


def test_ids_outside_class_list_are_fatal(folder, registered_datasets):
    label = np.array([[0, 1, 255], [3, 7, 2]], np.uint8)  # 3 and 7 are not among 3 classes; 255 is ignore
    add_pair(folder, "c", label)
    registered_datasets("ids")
    register(folder, "ids")
    with pytest.raises(DatasetError) as err:
        DatasetCatalog.get("ids")
    msg = str(err.value)
    assert "label ids outside the 3 classes" in msg and "(valid 0..2, ignore 255)" in msg
    assert f"{folder / 'labels' / 'c.png'} has [3, 7]" in msg
    # with another ignore value, 255 is out of range too
    registered_datasets("ids0")
    register(folder, "ids0", ignore_label=3)
    with pytest.raises(DatasetError, match=r"c.png has \[7, 255\]"):
        DatasetCatalog.get("ids0")


def test_nothing_usable_is_fatal(tmp_path, registered_datasets):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.json").write_text('["x"]')
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    registered_datasets("empty")
    register(tmp_path, "empty")
    with pytest.raises(DatasetError, match="no usable image/label pair"):
        DatasetCatalog.get("empty")


def test_missing_folder_and_class_list(folder, registered_datasets):
    registered_datasets("gone")
    register_custom_dataset("gone", folder / "nope", folder / "labels", folder / "classes.json")
    with pytest.raises(DatasetNotFoundError, match=f"{folder / 'nope'} not found"):
        check_dataset_exists("gone")
    with pytest.raises(DatasetNotFoundError, match=f"{folder / 'nope'} not found"):
        DatasetCatalog.get("gone")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        register_custom_dataset("gone2", folder / "images", folder / "labels", folder / "missing.json")


def test_builtin_name_refused(folder):
    with pytest.raises(ValueError, match="builtin benchmark name"):
        register(folder, "ade20k_150_test_sem_seg")
