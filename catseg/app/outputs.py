"""The files one segmentation result leaves in an output folder, for the CLI and the web page.

For an input `photo.jpg` (stem `photo`):
  photo_overlay.png  the labels blended over the image, legend of the classes present
  photo_labels.png   the label map: class ids (uint8; uint16 when there are more than 255 classes)
  photo.json         the JSON below

JSON schema ("catseg-demo/1"):
  schema        "catseg-demo/1"
  input         the input path as given/found
  image_size    [H, W] of the input (after EXIF rotation)
  output_size   [h, w] of the label map and overlay (smaller than image_size only when the
                input's longer side exceeds TEST.MAX_INPUT_SIDE)
  classes       [{"id": int, "name": str, "pixel_share": float}] every class of the vocabulary,
                id = value in the label map, share = fraction of label-map pixels (sums to 1)
  present       ids of the classes with pixel_share > 0, largest share first (= the legend)
  label_map     file name of the label-map PNG;  label_dtype  "uint8" or "uint16"
  overlay       file name of the overlay PNG
  config        the config file;  weights  the checkpoint ("" for random / built weights)
Each file is written atomically (catseg/atomic.py): an interrupted run leaves no partial file.

Names from hostile inputs: an output stem is the input's file name made safe (`safe_stem`):
UTF-8 (undecodable bytes become U+FFFD), no path separators or control characters, at most
STEM_BYTES bytes, so every output file lands inside the output folder; a target that is a
symlink is replaced, never written through. The JSON's `input` shows undecodable bytes of the
path as \\xNN escapes.
"""
import json
import os
import re
from pathlib import Path
from typing import List, Sequence

import numpy as np
from PIL import Image

from ..atomic import atomic_write
from ..errors import OutputError
from .overlay import render_overlay

SCHEMA = "catseg-demo/1"
STEM_BYTES = 200  # + "_overlay.png" stays under the usual 255-byte file-name limit
UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")  # control characters and path separators


def display_path(path) -> str:
    """`path` as valid UTF-8 text: undecodable bytes of a file name as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def safe_stem(path: Path) -> str:
    """The output stem of an input file: its stem as UTF-8 (bad bytes -> U+FFFD), separators and
    control characters -> "_", cut to STEM_BYTES bytes; "image" when nothing is left or it
    would be "." or ".." ."""
    stem = UNSAFE.sub("_", os.fsencode(path.stem).decode("utf-8", "replace"))
    stem = stem.encode("utf-8")[:STEM_BYTES].decode("utf-8", "ignore")
    return stem if stem.strip(".") else "image"


def output_stems(files: Sequence[Path]) -> List[str]:
    """A distinct safe output stem per file (`safe_stem`), then stem_2, stem_3... on repeats."""
    used, stems = set(), []
    for f in files:
        base = safe_stem(f)
        stem, n = base, 1
        while stem in used:
            n += 1
            stem = f"{base}_{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def output_path(out_dir: Path, name: str) -> Path:
    """`out_dir / name`, refused (OutputError) unless it is a file directly inside `out_dir`."""
    path = out_dir / name
    if name != Path(name).name or name in ("", ".", "..") or UNSAFE.search(name):
        raise OutputError(f"output name {display_path(name)!r} would leave the output folder {display_path(out_dir)}")
    return path


def write_outputs(result, source: Path, out_dir: Path, stem: str, config: str, weights: str) -> dict:
    """Write the overlay, label map and JSON of one result; returns the JSON dict.

    A failed write (full disk, quota, file-size limit, ...) removes this result's files written
    so far and raises OutputError, one line: an image has all its files or none."""
    written: List[Path] = []

    def write(name: str, write_fn) -> None:
        path = output_path(out_dir, name)
        try:
            atomic_write(path, write_fn)
        except OSError as e:
            for done in written:
                done.unlink(missing_ok=True)
            raise OutputError(f"cannot write {display_path(path)}: {e.strerror or e}; "
                              f"nothing of {display_path(source.name)} is left half-written") from None
        written.append(path)

    labels = result.labels.numpy()
    dtype = np.uint8 if len(result.classes) <= 255 else np.uint16
    write(f"{stem}_labels.png", lambda f: Image.fromarray(labels.astype(dtype)).save(f, format="PNG"))
    shares, present = result.pixel_shares(), result.present()
    overlay, _ = render_overlay(result.image, labels, result.classes, present, shares)
    write(f"{stem}_overlay.png", lambda f: overlay.save(f, format="PNG"))
    record = {
        "schema": SCHEMA,
        "input": display_path(source),
        "image_size": list(result.image_size),
        "output_size": list(labels.shape),
        "classes": [{"id": i, "name": n, "pixel_share": round(s, 6)}
                    for i, (n, s) in enumerate(zip(result.classes, shares))],
        "present": present,
        "label_map": f"{stem}_labels.png",
        "label_dtype": np.dtype(dtype).name,
        "overlay": f"{stem}_overlay.png",
        "config": config,
        "weights": weights,
    }
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    write(f"{stem}.json", lambda f: f.write(text.encode("utf-8")))
    return record


def summary_line(source: Path, record: dict, seconds: float, top: int = 4) -> str:
    """'photo.jpg  640x480  3 classes: sky 45.1%; dog, puppy 30.2%; grass 24.7%  (0.52 s)'."""
    classes = record["classes"]
    parts = [f"{classes[i]['name']} {classes[i]['pixel_share']:.1%}" for i in record["present"][:top]]
    more = len(record["present"]) - top
    h, w = record["image_size"]
    return (f"{display_path(source)}  {w}x{h}  {len(record['present'])} classes: {'; '.join(parts)}"
            f"{f'; +{more} more' if more > 0 else ''}  ({seconds:.2f} s)")
