"""Training mapper: resize, category-area crop, colour augmentation, flip, padding."""
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform
from PIL import Image

from catseg.config import add_catseg_config
from catseg.data.mapper import SemSegDatasetMapper
from catseg.padding import pad_to_multiple


def make_cfg(**overrides):
    cfg = get_cfg()
    add_catseg_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.DATASETS.TRAIN = ()
    cfg.INPUT.MIN_SIZE_TRAIN = (40,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (32, 32)
    cfg.INPUT.SIZE_DIVISIBILITY = 48
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def write_sample(tmp_path, label, ext=".png"):
    """Image whose red channel is 10 * label (so alignment survives crop and flip)."""
    image = np.zeros(label.shape + (3,), np.uint8)
    image[..., 0] = (label % 25) * 10
    Image.fromarray(image).save(tmp_path / "im.png")
    Image.fromarray(label).save(tmp_path / f"lb{ext}")
    return {"file_name": str(tmp_path / "im.png"), "sem_seg_file_name": str(tmp_path / f"lb{ext}")}


def test_crop_flip_pad_keep_image_and_label_aligned(tmp_path):
    rng = np.random.RandomState(0)
    label = np.kron(rng.randint(0, 5, (10, 15)), np.ones((4, 4), int)).astype(np.uint8)  # 40x60
    record = write_sample(tmp_path, label)
    mapper = SemSegDatasetMapper(make_cfg(), True)
    assert mapper.ignore_label == 255  # no train dataset: MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    np.random.seed(0)
    flips = set()
    for _ in range(8):
        out = mapper(record)
        image, sem_seg = out["image"], out["sem_seg"]
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 48)  # 32x32 crop padded to 48
        assert sem_seg.dtype == torch.int64 and sem_seg.shape == (48, 48)
        assert (image[:, 32:, :] == 128).all() and (image[:, :, 32:] == 128).all()
        assert (sem_seg[32:, :] == 255).all() and (sem_seg[:, 32:] == 255).all()
        crop = sem_seg[:32, :32]
        assert torch.equal(image[0, :32, :32], (crop * 10).to(torch.uint8))
        # the crop is a window of the label, possibly mirrored
        windows = [np.lib.stride_tricks.sliding_window_view(lab, (32, 32)) for lab in (label, label[:, ::-1])]
        found = [bool((w == crop.numpy()).all(axis=(-2, -1)).any()) for w in windows]
        assert any(found)
        flips.add(found.index(True))
    assert flips == {0, 1}  # both orientations occur


def test_configured_augmentations(tmp_path):
    cfg = make_cfg(**{"INPUT.COLOR_AUG_SSD": True, "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 0.5})
    augs = SemSegDatasetMapper(cfg, True).augmentations.augs
    assert isinstance(augs[0], T.ResizeShortestEdge) and isinstance(augs[3], T.RandomFlip)
    assert isinstance(augs[1], T.RandomCrop_CategoryAreaConstraint)
    assert augs[1].single_category_max_area == 0.5 and augs[1].ignored_category == 255
    assert augs[1].crop_aug.crop_size == (32, 32)
    colour = augs[2].tfm  # a Transform wrapped as an Augmentation
    assert isinstance(colour, ColorAugSSDTransform) and colour.is_rgb

    cfg = make_cfg(**{"INPUT.CROP.ENABLED": False})
    assert [type(a) for a in SemSegDatasetMapper(cfg, True).augmentations.augs] == [
        T.ResizeShortestEdge, T.RandomFlip]


def test_single_category_rule_avoids_one_class_crops(tmp_path):
    label = np.zeros((40, 60), np.uint8)
    label[:, 40:] = 1  # class 0 covers >= 90% of a 32x32 crop starting at x0 <= 11 (12 of 29)
    record = write_sample(tmp_path, label)
    cfg = make_cfg(**{"INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 0.9, "INPUT.SIZE_DIVISIBILITY": -1})
    mapper = SemSegDatasetMapper(cfg, True)
    np.random.seed(1)
    shares = [np.bincount(mapper(record)["sem_seg"].flatten().numpy(), minlength=2)[0] / 1024 for _ in range(10)]
    assert all(s < 0.9 for s in shares)  # a plain random crop fails this 1 - (17/29)^10 = 99.5%


def test_resize_and_16bit_label_padded_with_its_ignore(tmp_path):
    from detectron2.data import MetadataCatalog
    label = np.full((20, 30), 65535, np.uint16)
    label[5:15, 5:25] = 700
    record = write_sample(tmp_path, label, ext=".tif")
    MetadataCatalog.get("mapper_tif_test").ignore_label = 65535
    cfg = make_cfg(**{"INPUT.CROP.ENABLED": False, "INPUT.SIZE_DIVISIBILITY": 32})
    cfg.DATASETS.TRAIN = ("mapper_tif_test",)
    mapper = SemSegDatasetMapper(cfg, True)
    out = mapper(record)
    assert out["image"].shape == (3, 64, 64)  # resized to 40x60, padded to 64x64
    assert set(out["sem_seg"].unique().tolist()) == {700, 65535}
    assert (out["sem_seg"][40:] == 65535).all() and (out["sem_seg"][:, 60:] == 65535).all()
    assert (out["sem_seg"][10:30, 10:50] == 700).all()


def test_pad_to_multiple_is_noop_when_off():
    image, sem_seg = torch.zeros(3, 5, 7, dtype=torch.uint8), torch.zeros(5, 7, dtype=torch.long)
    assert pad_to_multiple(image, -1, 128).shape == (3, 5, 7)
    padded_image, padded_seg = pad_to_multiple(image, 4, 128), pad_to_multiple(sem_seg, 4, 9)
    assert padded_image.shape == (3, 8, 8) and padded_seg[5:].eq(9).all() and padded_seg[:, 7:].eq(9).all()
    assert padded_image[:, 5:].eq(128).all() and padded_image[:, :5, :7].eq(0).all()
