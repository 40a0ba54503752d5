"""Convert ADE20K-150 validation labels (ADEChallengeData2016) to detectron2 train ids.

Input:  <root>/ADEChallengeData2016/{images,annotations}/validation (from ADEChallengeData2016.zip)
Output: <root>/ADEChallengeData2016/annotations_detectron2/validation/*.png
Rule:   train id = raw - 1 in uint8 (raw 0 = unlabeled becomes 255 = ignore).
"""
import sys

import numpy as np

from prepare_common import count_files, make_parser, read_array, require, run_jobs, run_main, save_png

SOURCE = ("download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu and unzip it "
          "into the dataset root (see datasets/README.md)")
OFFICIAL_COUNTS = {"validation": 2000}


def convert_ade150(raw: np.ndarray) -> np.ndarray:
    """(H, W) uint8 raw ADE-150 label -> (H, W) uint8 train ids (0 -> 255)."""
    return raw.astype(np.uint8) - np.uint8(1)


def prepare(args) -> dict:
    base = args.root / "ADEChallengeData2016"
    raw_dir, out_dir = base / "annotations" / "validation", base / "annotations_detectron2" / "validation"
    require([base, base / "images" / "validation", raw_dir], SOURCE)
    jobs = [([out_dir / raw.name], lambda raw=raw: save_png(out_dir / raw.name, convert_ade150(read_array(raw))))
            for raw in sorted(raw_dir.glob("*.png"))]
    run_jobs(jobs, "ADE-150 validation")
    return {"validation": count_files(out_dir, ".png")}


def main(argv=None) -> int:
    parser = make_parser(__file__, __doc__, OFFICIAL_COUNTS)
    return run_main(prepare, parser, OFFICIAL_COUNTS, "labels", argv)


if __name__ == "__main__":
    sys.exit(main())
