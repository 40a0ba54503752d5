"""Builtin benchmark registration: names, metadata, lazy loading, missing-folder messages."""
import os
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from catseg.data.class_names import load_class_names
from catseg.data.datasets import BENCHMARKS, DatasetNotFoundError, check_dataset_exists, register_builtin_datasets

REPO = Path(__file__).resolve().parents[1]
TABLE = {  # name: (label folder, ignore, number of dataset classes, prepare script)
    "coco_2017_train_stuff_all_sem_seg": ("coco/annotations_detectron2/train2017", 255, 171, "prepare_coco_stuff.py"),
    "coco_2017_test_stuff_all_sem_seg": ("coco/annotations_detectron2/val2017", 255, 171, "prepare_coco_stuff.py"),
    "ade20k_150_test_sem_seg": ("ADEChallengeData2016/annotations_detectron2/validation", 255, 150,
                                "prepare_ade150.py"),
    "ade20k_full_sem_seg_freq_val_all": ("ADE20K_2021_17_01/annotations_detectron2/validation", 65535, 847,
                                         "prepare_ade847.py"),
    "context_59_test_sem_seg": ("VOCdevkit/VOC2010/annotations_detectron2/pc59_val", 255, 59, "prepare_pc59.py"),
    "context_459_test_sem_seg": ("VOCdevkit/VOC2010/annotations_detectron2/pc459_val", 459, 459, "prepare_pc459.py"),
    "voc_2012_test_sem_seg": ("VOCdevkit/VOC2012/annotations_detectron2/val", 255, 20, "prepare_voc.py"),
    "voc_2012_test_background_sem_seg": ("VOCdevkit/VOC2012/annotations_detectron2_bg/val", 255, 21, "prepare_voc.py"),
}


def test_official_names_and_metadata(tmp_path, builtin_root):
    builtin_root(tmp_path)
    assert set(BENCHMARKS) == set(TABLE)
    for name, (label_dir, ignore, num_classes, prepare) in TABLE.items():
        meta = MetadataCatalog.get(name)
        assert meta.sem_seg_root == str(tmp_path / label_dir)
        assert meta.ignore_label == ignore and len(meta.stuff_classes) == num_classes
        assert len(meta.stuff_colors) == num_classes
        assert (REPO / "datasets" / prepare).is_file() and meta.prepare_script == f"datasets/{prepare}"
        assert meta.prompt_classes == load_class_names(meta.class_list)
        assert name in DatasetCatalog.list()


def test_missing_folder_names_path_and_prepare_script(tmp_path, builtin_root):
    builtin_root(tmp_path)
    for name, (label_dir, _, _, prepare) in TABLE.items():
        image_dir = tmp_path / MetadataCatalog.get(name).image_root
        for call in (check_dataset_exists, DatasetCatalog.get):
            with pytest.raises(DatasetNotFoundError) as err:
                call(name)
            msg = str(err.value)
            assert "\n" not in msg
            assert msg.startswith(f"{image_dir} not found (dataset {name}): download ")
            assert f"run python datasets/{prepare}" in msg
    # images present, labels not yet converted
    (tmp_path / "ADEChallengeData2016/images/validation").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=(
            f"{tmp_path}/ADEChallengeData2016/annotations_detectron2/validation not found .*"
            "ADEChallengeData2016.zip .*prepare_ade150.py")):
        check_dataset_exists("ade20k_150_test_sem_seg")
    (tmp_path / "ADEChallengeData2016/annotations_detectron2/validation").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="holds no .png labels .*prepare_ade150.py"):
        check_dataset_exists("ade20k_150_test_sem_seg")


def test_unknown_dataset():
    with pytest.raises(KeyError, match="not registered"):
        check_dataset_exists("no_such_dataset")


def test_registration_reads_nothing_under_the_dataset_root(tmp_path, monkeypatch, builtin_root):
    """What importing catseg does (register_builtin_datasets() with $DETECTRON2_DATASETS) opens,
    lists or stats no path under the root."""
    root = str(tmp_path / "root")
    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    seen = []
    real_stat, real_scandir, real_listdir = os.stat, os.scandir, os.listdir

    def spy(real):
        def wrapped(path=".", *args, **kwargs):
            if root in str(path):
                seen.append((real.__name__, path))
            return real(path, *args, **kwargs)
        return wrapped

    for name, real in [("stat", real_stat), ("scandir", real_scandir), ("listdir", real_listdir)]:
        monkeypatch.setattr(os, name, spy(real))
    monkeypatch.setattr("builtins.open", spy(open))
    register_builtin_datasets()
    monkeypatch.undo()
    assert seen == []
    assert MetadataCatalog.get("ade20k_150_test_sem_seg").image_root == f"{root}/ADEChallengeData2016/images/validation"
    with pytest.raises(DatasetNotFoundError):  # the disk is read when the dataset is loaded
        DatasetCatalog.get("ade20k_150_test_sem_seg")
