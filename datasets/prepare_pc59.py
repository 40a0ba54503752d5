"""Convert PASCAL-Context-59 validation labels (trainval_merged.json) to detectron2 train ids.

Input:  <root>/VOCdevkit/VOC2010/JPEGImages (VOC2010) and
        <root>/VOCdevkit/VOC2010/trainval_merged.json (COCO-style RLE masks)
Output: <root>/VOCdevkit/VOC2010/annotations_detectron2/pc59_val/<image stem>.png
Rule:   paint each annotation's mask with its category_id in file order (later ones win) on
        zeros; the raw id at position i of catseg/data/ids/pascal_context_59_raw_ids.json becomes
        i - 1 in uint8 (raw 0 -> 255); every other value 255. Only images of phase "val".
"""
import json
import sys
from collections import defaultdict
from typing import Dict, List, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from prepare_common import (apply_table, count_files, load_ids_json, lookup_table, make_parser,
                            require, run_jobs, run_main, save_png)

SOURCE = ("download VOCtrainval_03-May-2010.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2010) "
          "into the dataset root and trainval_merged.json (PASCAL-Context, "
          "https://cs.stanford.edu/~roozbeh/pascal-context) into VOCdevkit/VOC2010 "
          "(see datasets/README.md)")
OFFICIAL_COUNTS = {"pc59_val": 5104}


def pc59_table(raw_ids: Sequence[int]) -> np.ndarray:
    """uint8 lookup table: raw_ids[i] -> i - 1 (uint8, so raw_ids[0] -> 255), others 255."""
    return lookup_table({raw: (i - 1) % 256 for i, raw in enumerate(raw_ids)}, 255, np.uint8)


def paint_annotations(height: int, width: int, annotations: List[dict]) -> np.ndarray:
    """(H, W) int32 raw category ids: zeros, then each RLE mask painted in order."""
    canvas = np.zeros((height, width), dtype=np.int32)
    for ann in annotations:
        canvas[mask_utils.decode(ann["segmentation"]).astype(bool)] = ann["category_id"]
    return canvas


def convert_pc59(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(H, W) raw PASCAL-Context ids -> (H, W) uint8 PC-59 train ids."""
    return apply_table(raw, table, 255)


def val_images(merged: dict) -> Dict[int, dict]:
    """image_id -> image entry of the val images, and their annotations under "annotations"."""
    annotations = defaultdict(list)
    for ann in merged["annos_segmentation"]:
        annotations[ann["image_id"]].append(ann)
    return {img["image_id"]: dict(img, annotations=annotations[img["image_id"]])
            for img in merged["images"] if img["phase"] == "val"}


def prepare(args) -> dict:
    voc = args.root / "VOCdevkit" / "VOC2010"
    merged_path = voc / "trainval_merged.json"
    require([voc / "JPEGImages", merged_path], SOURCE)
    with open(merged_path) as f:
        images = val_images(json.load(f))
    table = pc59_table(load_ids_json("pascal_context_59_raw_ids.json"))
    out_dir = voc / "annotations_detectron2" / "pc59_val"

    def convert(img, out):
        raw = paint_annotations(img["height"], img["width"], img["annotations"])
        save_png(out, convert_pc59(raw, table))

    jobs = []
    for img in images.values():
        out = out_dir / (img["file_name"].rsplit(".", 1)[0] + ".png")
        jobs.append(([out], lambda img=img, out=out: convert(img, out)))
    run_jobs(jobs, "PASCAL-Context-59 val")
    return {"pc59_val": count_files(out_dir, ".png")}


def main(argv=None) -> int:
    parser = make_parser(__file__, __doc__, OFFICIAL_COUNTS)
    return run_main(prepare, parser, OFFICIAL_COUNTS, "labels", argv)


if __name__ == "__main__":
    sys.exit(main())
