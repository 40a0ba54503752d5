"""Training-time dataset mapper for semantic segmentation (INPUT.DATASET_MAPPER_NAME
"mask_former_semantic").

Per image: resize the short side (INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN / MIN_SIZE_TRAIN_SAMPLING),
random crop (INPUT.CROP.*, retried until no single class covers more than
INPUT.CROP.SINGLE_CATEGORY_MAX_AREA of the crop, the ignore value excepted), SSD colour
augmentation (INPUT.COLOR_AUG_SSD), horizontal flip, then padding to a multiple of
INPUT.SIZE_DIVISIBILITY (image with 128, label with the dataset's ignore value).
Evaluation uses detectron2's DatasetMapper (resize only).
"""
import copy
from typing import List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform

from ..padding import pad_to_multiple
from .datasets import read_label

IMAGE_PAD_VALUE = 128  # grey, the official mapper's image padding


def build_train_augmentations(cfg, ignore_label: int) -> List[T.Augmentation]:
    """The configured training augmentations, in order."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            ignore_label))
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    augs.append(T.RandomFlip())
    return augs


class SemSegDatasetMapper:
    """Maps a dataset dict {"file_name", "sem_seg_file_name", ...} to a training sample:
    "image" (C, H, W) uint8 tensor in INPUT.FORMAT and "sem_seg" (H, W) int64 tensor.

    Usable as `build_detection_train_loader(cfg, mapper=SemSegDatasetMapper(cfg, True))`.
    """

    @configurable
    def __init__(self, is_train=True, *, augmentations, image_format, ignore_label,
                 size_divisibility):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility

    @classmethod
    def from_config(cls, cfg, is_train=True):
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None
        ignore_label = meta.get("ignore_label", None) if meta is not None else None
        if ignore_label is None:
            ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        return {
            "is_train": is_train,
            "augmentations": build_train_augmentations(cfg, ignore_label),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": ignore_label,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        sem_seg = read_label(dataset_dict["sem_seg_file_name"]).astype(np.float64)
        if sem_seg.shape != image.shape[:2]:
            raise ValueError(f"label {dataset_dict['sem_seg_file_name']} is {sem_seg.shape} but "
                             f"image {dataset_dict['file_name']} is {image.shape[:2]}")
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        sem_seg = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        dataset_dict["image"] = pad_to_multiple(image, self.size_divisibility, IMAGE_PAD_VALUE).contiguous()
        dataset_dict["sem_seg"] = pad_to_multiple(sem_seg, self.size_divisibility, self.ignore_label).contiguous()
        return dataset_dict
