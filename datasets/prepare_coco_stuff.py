"""Convert COCO-Stuff-171 labels (stuffthingmaps_trainval2017) to detectron2 train ids.

Input:  <root>/coco/images/{train2017,val2017}/*.jpg (COCO 2017 images) and
        <root>/coco/annotations/{train2017,val2017}/*.png (stuffthingmaps: raw COCO-Stuff ids)
Output: <root>/coco/annotations_detectron2/{train2017,val2017}/*.png
Rule:   raw ids of catseg/data/ids/coco_stuff_171_ids.json get their train id; every other
        value (255 = unlabeled, unused ids) becomes 255.
"""
import sys

import numpy as np

from prepare_common import (apply_table, count_files, load_ids_json, lookup_table, make_parser,
                            read_array, require, run_jobs, run_main, save_png)

SOURCE = ("download train2017.zip and val2017.zip from https://cocodataset.org into coco/images, "
          "and stuffthingmaps_trainval2017.zip from https://github.com/nightrome/cocostuff into "
          "coco/annotations (see datasets/README.md)")
OFFICIAL_COUNTS = {"train2017": 118287, "val2017": 5000}


def coco_stuff_table() -> np.ndarray:
    """uint8 lookup table raw COCO-Stuff id -> train id (255 for unlisted ids)."""
    return lookup_table({e["raw_id"]: e["train_id"] for e in load_ids_json("coco_stuff_171_ids.json")},
                        255, np.uint8)


def convert_coco_stuff(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(H, W) raw COCO-Stuff ids -> (H, W) uint8 train ids."""
    return apply_table(raw.astype(np.int64), table, 255)


def prepare(args) -> dict:
    coco = args.root / "coco"
    require([coco / "images" / s for s in OFFICIAL_COUNTS]
            + [coco / "annotations" / s for s in OFFICIAL_COUNTS], SOURCE)
    table = coco_stuff_table()
    counts = {}
    for split in OFFICIAL_COUNTS:
        raw_dir, out_dir = coco / "annotations" / split, coco / "annotations_detectron2" / split
        jobs = [([out_dir / raw.name],
                 lambda raw=raw, out=out_dir / raw.name: save_png(out, convert_coco_stuff(read_array(raw), table)))
                for raw in sorted(raw_dir.glob("*.png"))]
        run_jobs(jobs, f"COCO-Stuff {split}")
        counts[split] = count_files(out_dir, ".png")
    return counts


def main(argv=None) -> int:
    parser = make_parser(__file__, __doc__, OFFICIAL_COUNTS)
    return run_main(prepare, parser, OFFICIAL_COUNTS, "labels", argv)


if __name__ == "__main__":
    sys.exit(main())
