"""The output folder of `catseg-label`: pseudo-labels a training run reads as they are.

    OUT/classes.json          the class list (JSON list of names; label value i = class i)
    OUT/train.yaml            a config to fine-tune on the labels: `_BASE_` (default own_data.yaml)
                              with DATASETS.CUSTOM ["pseudo_labels:OUT/images:OUT/labels:OUT/classes.json"]
    OUT/images/<stem><ext>    a link to each labelled input (the dataset's image folder)
    OUT/labels/<stem>.png     class ids, uint8 (uint16 with more than 255 classes)
    OUT/probs/<stem>.npz      with --save-probs: "classes" (k, h, w) uint8/uint16 ids of the k
                              most probable classes per pixel, best first; "scores" (k, h, w)
                              float16 their probabilities
    OUT/overlays/<stem>.png   with --overlay: the labels over the image, with a legend
    OUT/records/<stem>.json   written last: the input path, sizes, classes present; its presence
                              means the image is done (a restart skips it without opening it)
    OUT/failures.jsonl        {"path": ..., "reason": one line} per unreadable input
    OUT/summary.json          the last run's counts and speeds

Every file is written atomically (catseg/atomic.py), so a killed run leaves whole files or
none (its temporary ".<name>.<random>.tmp" files are removed at the end of the next run); an
image killed half-way has no record and is labelled again. Outputs are named by the
input's stem: inputs sharing a stem (a.jpg and a.png, or two folders) share one output, one
of them ends up there and the others count as skipped (or overwrite it when labelled at the
same time) — as in the dataset format itself, which pairs images and labels by stem.
"""
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import yaml
from PIL import Image

from ..atomic import atomic_write
from .overlay import render_overlay

SCHEMA = "catseg-label/1"
DATASET_NAME = "pseudo_labels"
UINT8_IGNORE, UINT16_IGNORE = 255, 65535


def label_dtype(num_classes: int):
    """uint8 label maps up to 255 classes (255 stays free as the ignore value), else uint16."""
    return np.uint8 if num_classes <= 255 else np.uint16


def top_k_arrays(result, k: int, dtype) -> dict:
    """A Segmentation's top-k (`Segmentation.top_k`: from its probabilities, or the top-k of a
    labels-only result) -> {"classes": (k, h, w) ids, best first, "scores": (k, h, w) float16}.
    Among equal scores the lower id comes first, as in the label map's argmax."""
    scores, ids = result.top_k(k)
    return {"classes": ids.numpy().astype(dtype), "scores": scores.numpy().astype(np.float16)}


class LabelFolder:
    """Writes and reads back the folder described in the module docstring."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.failures = self.root / "failures.jsonl"
        self.summary = self.root / "summary.json"

    def path(self, kind: str, stem: str) -> Path:
        suffix = {"labels": ".png", "probs": ".npz", "overlays": ".png", "records": ".json"}[kind]
        return self.root / kind / f"{stem}{suffix}"

    def make_dirs(self, probs: bool, overlays: bool) -> None:
        kinds = ["images", "labels", "records"] + ["probs"] * probs + ["overlays"] * overlays
        for kind in kinds:
            (self.root / kind).mkdir(parents=True, exist_ok=True)

    def is_done(self, source: str) -> bool:
        """Whether input path `source` has its record (one stat; the image is not opened)."""
        return os.path.exists(os.path.join(self.root, "records", stem_of(source) + ".json"))

    def write(self, source: str, result, top_k: int = 0, overlay: bool = False) -> None:
        """All outputs of one Segmentation of input path `source`, the record last."""
        stem, labels = stem_of(source), result.labels.numpy()
        dtype = label_dtype(len(result.classes))
        self.link_image(source)
        atomic_write(self.path("labels", stem), lambda f: Image.fromarray(labels.astype(dtype)).save(f, format="PNG"))
        if top_k:
            arrays = top_k_arrays(result, top_k, dtype)
            atomic_write(self.path("probs", stem), lambda f: np.savez(f, **arrays))
        shares, present = result.pixel_shares(), result.present()
        if overlay:
            image, _ = render_overlay(result.image, labels, result.classes, present, shares)
            atomic_write(self.path("overlays", stem), lambda f: image.save(f, format="PNG"))
        record = {"schema": SCHEMA, "input": str(source), "image_size": list(result.image_size),
                  "output_size": list(labels.shape), "label_map": f"labels/{stem}.png",
                  "present": [{"id": i, "name": result.classes[i], "pixel_share": round(shares[i], 6)}
                              for i in present]}
        write_json(self.path("records", stem), record)

    def link_image(self, source: str) -> None:
        """OUT/images/<name> -> the input (a symbolic link; a copy where links are not allowed)."""
        target = self.root / "images" / os.path.basename(source)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            os.symlink(os.path.abspath(source), tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)

    def add_failure(self, path, reason: str) -> None:
        """Append one line to failures.jsonl (one write of an O_APPEND file: lines of several
        processes never interleave)."""
        line = json.dumps({"path": str(path), "reason": reason}, ensure_ascii=False) + "\n"
        fd = os.open(self.failures, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)

    def tidy_failures(self) -> int:
        """Rewrite failures.jsonl with the latest line per path, leaving out inputs labelled since;
        returns the number of lines kept."""
        if not self.failures.exists():
            return 0
        latest = {}
        with open(self.failures, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    latest[entry["path"]] = entry
        kept = [e for p, e in latest.items() if not self.is_done(p)]
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept)
        atomic_write(self.failures, lambda f: f.write(text.encode("utf-8")))
        return len(kept)

    def remove_temporary_files(self) -> int:
        """Delete the temporary files of writes a killed process left (".<name>.<random>.tmp");
        call only when no process is writing. Returns how many."""
        removed = 0
        for kind in ("images", "labels", "probs", "overlays", "records", ""):
            folder = self.root / kind
            if not folder.is_dir():
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                        os.remove(entry.path)
                        removed += 1
        return removed

    def classes(self) -> Optional[List[str]]:
        """The class list of an earlier run (None for a new folder)."""
        path = self.root / "classes.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def write_classes(self, classes: Sequence[str]) -> None:
        write_json(self.root / "classes.json", list(classes))

    def write_train_config(self, classes: Sequence[str], base: str) -> Path:
        """OUT/train.yaml: `base` with this folder as its only dataset (training and test)."""
        ignore = UINT8_IGNORE if label_dtype(len(classes)) == np.uint8 else UINT16_IGNORE
        root = self.root.resolve()
        spec = f"{DATASET_NAME}:{root / 'images'}:{root / 'labels'}:{root / 'classes.json'}:{ignore}"
        config = {"_BASE_": base, "DATASETS": {"CUSTOM": [spec], "TRAIN": [DATASET_NAME], "TEST": [DATASET_NAME]},
                  "OUTPUT_DIR": str(root / "train")}
        text = ("# Written by catseg-label: fine-tune on these pseudo-labels with\n"
                f"#   python train_net.py --config-file {root / 'train.yaml'}\n"
                "# (the test set is the pseudo-labels too: its mIoU is agreement with the labelling model).\n"
                + yaml.safe_dump(config, sort_keys=False))
        path = self.root / "train.yaml"
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        return path


def stem_of(path: str) -> str:
    """'photos/cat.01.jpg' -> 'cat.01' (os.path, not pathlib: see catseg/app/input_stream.py)."""
    return os.path.splitext(os.path.basename(path))[0]


def write_json(path: Path, value) -> None:
    text = json.dumps(value, indent=1, ensure_ascii=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_failures(path: Path) -> List[dict]:
    """The entries of a failures.jsonl."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
