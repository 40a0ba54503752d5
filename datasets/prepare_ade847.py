"""Convert the ADE20K-full validation set (ADE20K_2021_17_01) to the 847-class benchmark.

Input:  <root>/ADE20K_2021_17_01/index_ade20k.pkl and, for every validation entry of it
        (filename "ADE_val_*"), <root>/<folder>/<filename> (.jpg) and its *_seg.png.
Output: <root>/ADE20K_2021_17_01/images_detectron2/validation/<filename> (re-saved image) and
        <root>/ADE20K_2021_17_01/annotations_detectron2/validation/<stem>.tif (uint16 labels).
Rule:   ADE object id per pixel = (R / 10).astype(int32) * 256 + G of the *_seg.png; ids of
        catseg/data/ids/ade20k_847_ids.json get their train id, everything else 65535 (ignore).
        Images whose short side exceeds 512 are resized to short side 512 (image bilinear,
        labels nearest).
"""
import pickle
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import cv2
import numpy as np

from prepare_common import (PrepareError, apply_table, count_files, load_ids_json, lookup_table,
                            make_parser, read_array, require, require_all, run_jobs, run_main,
                            save_image_cv2, save_tiff)

SOURCE = ("register and download ADE20K_2021_17_01 from "
          "https://groups.csail.mit.edu/vision/datasets/ADE20K into the dataset root "
          "(see datasets/README.md)")
OFFICIAL_COUNTS = {"validation": 2000}
SHORT_SIDE = 512
IGNORE = 65535


def decode_ade_seg(seg: np.ndarray) -> np.ndarray:
    """(H, W, 3+) uint8 ADE *_seg.png -> (H, W) int32 ADE object ids: (R / 10) * 256 + G."""
    r, g = seg[..., 0].astype(np.int32), seg[..., 1].astype(np.int32)
    return (r / 10).astype(np.int32) * 256 + g


def resized_shape(height: int, width: int, short: int = SHORT_SIDE) -> Optional[Tuple[int, int]]:
    """(h, w) with the short side `short` if the short side exceeds it, else None."""
    if min(height, width) <= short:
        return None
    if height < width:
        return short, round(width / height * short)
    return round(height / width * short), short


def ade847_table() -> np.ndarray:
    """uint16 lookup table ADE object id -> train id (65535 for the other ids)."""
    return lookup_table({e["ade_id"]: e["train_id"] for e in load_ids_json("ade20k_847_ids.json")},
                        IGNORE, np.uint16)


def convert_ade847(seg: np.ndarray, table: np.ndarray, shape: Optional[Tuple[int, int]]) -> np.ndarray:
    """(H, W, 3) *_seg.png -> uint16 train ids, resized (nearest) to `shape` (h, w) if given."""
    ids = decode_ade_seg(seg)
    if shape is not None:
        ids = cv2.resize(ids, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return apply_table(ids, table, IGNORE)


def validation_entries(index: dict) -> List[Tuple[str, str]]:
    """(folder, filename) of the validation images of index_ade20k.pkl."""
    return [(folder, name) for folder, name in zip(index["folder"], index["filename"])
            if name.split("_")[1] == "val"]


def image_path(root: Path, folder: str, filename: str) -> Path:
    """Where an index entry's image is: `folder` is relative to the dataset root (it starts
    with ADE20K_2021_17_01/); a folder relative to ADE20K_2021_17_01 itself is accepted too."""
    path = root / folder / filename
    if not path.exists() and (root / "ADE20K_2021_17_01" / folder / filename).exists():
        return root / "ADE20K_2021_17_01" / folder / filename
    return path


def seg_path(image: Path) -> Path:
    return image.with_name(image.stem + "_seg.png")


def convert_one(image: Path, out_image: Path, out_label: Path, table: np.ndarray) -> None:
    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise PrepareError(f"could not read {image}")
    shape = resized_shape(*bgr.shape[:2])
    if shape is not None:
        bgr = cv2.resize(bgr, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    save_image_cv2(out_image, bgr)
    save_tiff(out_label, convert_ade847(read_array(seg_path(image)), table, shape))


def prepare(args) -> dict:
    base = args.root / "ADE20K_2021_17_01"
    require([base, base / "index_ade20k.pkl"], SOURCE)
    with open(base / "index_ade20k.pkl", "rb") as f:
        entries = validation_entries(pickle.load(f))
    images = [image_path(args.root, folder, name) for folder, name in entries]
    require_all(images + [seg_path(p) for p in images], SOURCE)
    out_images = base / "images_detectron2" / "validation"
    out_labels = base / "annotations_detectron2" / "validation"
    table = ade847_table()
    jobs = []
    for image in images:
        out_image, out_label = out_images / image.name, out_labels / f"{image.stem}.tif"
        jobs.append(([out_image, out_label],
                     lambda i=image, oi=out_image, ol=out_label: convert_one(i, oi, ol, table)))
    run_jobs(jobs, "ADE-847 validation")
    return {"validation": count_files(out_labels, ".tif")}


def main(argv=None) -> int:
    parser = make_parser(__file__, __doc__, OFFICIAL_COUNTS)
    return run_main(prepare, parser, OFFICIAL_COUNTS, "labels", argv)


if __name__ == "__main__":
    sys.exit(main())
