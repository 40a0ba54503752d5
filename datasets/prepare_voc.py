"""Convert PASCAL VOC 2012 validation labels (SegmentationClassAug) for VOC-20 and VOC-20b.

Input:  <root>/VOCdevkit/VOC2012/JPEGImages, ImageSets/Segmentation/val.txt and
        <root>/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png (0 background, 1..20, 255)
Output: <root>/VOCdevkit/VOC2012/annotations_detectron2/val/<id>.png     (VOC-20)
        <root>/VOCdevkit/VOC2012/annotations_detectron2_bg/val/<id>.png  (VOC-20b)
Rule:   k -> k - 1 for k in 1..20; background 0 -> 255 (VOC-20) or 20 (VOC-20b); every other
        value 255. A label that is all 255 after conversion is not written.
The count check is on the val ids converted (official: 1,449), as VOC-20 writes fewer files.
"""
import sys
from pathlib import Path

import numpy as np

from prepare_common import (apply_table, lookup_table, make_parser, read_array, require,
                            require_all, run_jobs, run_main, save_png)

SOURCE = ("download VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012) "
          "into the dataset root and extract SegmentationClassAug (SBD-augmented labels) into "
          "VOCdevkit/VOC2012 (see datasets/README.md)")
OFFICIAL_COUNTS = {"val": 1449}
OUTPUTS = {"annotations_detectron2": 255, "annotations_detectron2_bg": 20}  # folder -> background id


def voc_table(background: int) -> np.ndarray:
    """uint8 lookup table raw VOC id -> train id (0 -> `background`, k -> k - 1, else 255)."""
    return lookup_table({0: background, **{k: k - 1 for k in range(1, 21)}}, 255, np.uint8)


def convert_voc(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(H, W) raw VOC label -> (H, W) uint8 train ids."""
    return apply_table(raw.astype(np.int64), table, 255)


def convert_one(raw_path: Path, outputs: dict) -> None:
    """Write every variant of one label ({out path: table}); all-255 results are not written."""
    raw = read_array(raw_path)
    for out, table in outputs.items():
        label = convert_voc(raw, table)
        if (label != 255).any():
            save_png(out, label)


def prepare(args) -> dict:
    voc = args.root / "VOCdevkit" / "VOC2012"
    split = voc / "ImageSets" / "Segmentation" / "val.txt"
    raw_dir = voc / "SegmentationClassAug"
    require([voc / "JPEGImages", split, raw_dir], SOURCE)
    ids = split.read_text().split()
    require_all([voc / "JPEGImages" / f"{i}.jpg" for i in ids] + [raw_dir / f"{i}.png" for i in ids],
                SOURCE)
    tables = {folder: voc_table(bg) for folder, bg in OUTPUTS.items()}
    jobs = []
    for image_id in ids:
        outputs = {voc / folder / "val" / f"{image_id}.png": table for folder, table in tables.items()}
        # an id whose outputs were dropped (all 255) is converted again on a re-run: cheap
        jobs.append((list(outputs), lambda r=raw_dir / f"{image_id}.png", o=outputs: convert_one(r, o)))
    run_jobs(jobs, "VOC 2012 val")
    return {"val": len(ids)}


def main(argv=None) -> int:
    parser = make_parser(__file__, __doc__, OFFICIAL_COUNTS)
    return run_main(prepare, parser, OFFICIAL_COUNTS, "ids", argv)


if __name__ == "__main__":
    sys.exit(main())
