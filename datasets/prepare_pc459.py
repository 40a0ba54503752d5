"""Convert PASCAL-Context-459 validation labels (trainval.tar.gz .mat files) to train ids.

Input:  <root>/VOCdevkit/VOC2010/JPEGImages (VOC2010) and <root>/VOCdevkit/VOC2010/trainval/<id>.mat
        (PASCAL-Context full annotations, a LabelMap array 1..459 per image)
Output: <root>/VOCdevkit/VOC2010/annotations_detectron2/pc459_val/<id>.tif (16-bit)
Rule:   train id = LabelMap - 1; the ignore value of the benchmark is 459. The ids are the 5,104
        of catseg/data/ids/pascalcontext_val.txt; ids without a .mat are skipped.
        A LabelMap value 0 (unlabeled; absent from the official release) is written as 459
        (ignore) where the official script's unsigned subtraction would wrap around.
"""
import sys
from typing import List

import numpy as np
from scipy.io import loadmat

from prepare_common import count_files, ids_dir, make_parser, require, run_jobs, run_main, save_tiff

SOURCE = ("download VOCtrainval_03-May-2010.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2010) "
          "into the dataset root and extract trainval.tar.gz (PASCAL-Context, "
          "https://cs.stanford.edu/~roozbeh/pascal-context) into VOCdevkit/VOC2010 "
          "(see datasets/README.md)")
OFFICIAL_COUNTS = {"pc459_val": 5104}
IGNORE = 459


def val_ids() -> List[str]:
    """The PASCAL-Context validation image ids (shipped pascalcontext_val.txt)."""
    return (ids_dir() / "pascalcontext_val.txt").read_text().split()


def convert_pc459(label_map: np.ndarray) -> np.ndarray:
    """(H, W) LabelMap (0..459) -> (H, W) uint16 train ids: k -> k - 1, 0 -> 459 (ignore)."""
    label_map = label_map.astype(np.int64)
    return np.where(label_map == 0, IGNORE, label_map - 1).astype(np.uint16)


def prepare(args) -> dict:
    voc = args.root / "VOCdevkit" / "VOC2010"
    mat_dir = voc / "trainval"
    require([voc / "JPEGImages", mat_dir], SOURCE)
    out_dir = voc / "annotations_detectron2" / "pc459_val"
    jobs = []
    for image_id in val_ids():
        mat, out = mat_dir / f"{image_id}.mat", out_dir / f"{image_id}.tif"
        if mat.exists():
            jobs.append(([out], lambda mat=mat, out=out: save_tiff(out, convert_pc459(loadmat(mat)["LabelMap"]))))
    run_jobs(jobs, "PASCAL-Context-459 val")
    return {"pc459_val": count_files(out_dir, ".tif")}


def main(argv=None) -> int:
    parser = make_parser(__file__, __doc__, OFFICIAL_COUNTS)
    return run_main(prepare, parser, OFFICIAL_COUNTS, "labels", argv)


if __name__ == "__main__":
    sys.exit(main())
