"""Dataset registration: the seven official benchmarks and user folders of images + labels.

Builtin benchmarks live under `$DETECTRON2_DATASETS` (default `./datasets`) in the layout the
`datasets/prepare_*.py` scripts write (see datasets/README.md). Registration only records
paths: the disk is read when `DatasetCatalog.get(name)` runs, and a missing folder then raises
`DatasetNotFoundError` naming the folder and the prepare script to run.
`check_dataset_exists(name)` runs the same check up front (e.g. before building a model).

Custom datasets: `register_custom_dataset(name, image_dir, label_dir, classes_json)`, or from
the config key DATASETS.CUSTOM through `register_from_config(cfg)`. Loading one checks every
pair; bad data is handled as follows (each message names the file):
- image without label, or label without image: skipped, one warning listing them;
- label size different from the image size: skipped, warning;
- label ids outside the class list (other than the ignore value): fatal `DatasetError`
  listing every offending file and its ids (the class list or the labels are wrong);
- a label that cannot be decoded (corrupt or truncated) or an image whose header cannot be
  read: `corrupt="error"` (DATALOADER.CORRUPT_LABELS "error", the default): fatal
  `DatasetError` naming the files, before training starts; "skip": skipped, one warning with
  their count and names;
- no usable pair left: fatal `DatasetError`.
"""
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ..errors import CatsegError
from ..image_io import IMAGE_EXTENSIONS
from ..palette import class_colors
from .class_names import load_class_names, resolve_class_list

logger = logging.getLogger(__name__)

LABEL_EXTENSIONS = (".png", ".tif", ".tiff")


class DatasetNotFoundError(CatsegError, FileNotFoundError):
    """A dataset folder or file is missing; the message says how to obtain it."""


class DatasetError(CatsegError, ValueError):
    """A dataset's content cannot be used (e.g. label ids outside the class list)."""


@dataclass(frozen=True)
class Benchmark:
    """One builtin benchmark: folders relative to the dataset root and its metadata."""

    image_dir: str
    label_dir: str
    label_ext: str
    ignore_label: int
    class_list: str  # shipped class list the model is prompted with
    prepare: str  # prepare script, relative to the repository
    download: str  # what to download and where from
    image_ext: str = ".jpg"
    evaluator_type: str = "sem_seg"
    dataset_classes: Optional[str] = None  # stuff_classes if not the prompts (VOC-20b)


_COCO = ("coco 2017 images (train2017.zip, val2017.zip) from cocodataset.org and stuffthingmaps_trainval2017.zip "
         "from github.com/nightrome/cocostuff")
_ADE150 = "ADEChallengeData2016.zip from sceneparsing.csail.mit.edu"
_ADE847 = "ADE20K_2021_17_01 from groups.csail.mit.edu/vision/datasets/ADE20K (registration required)"
_PC = ("VOCtrainval_03-May-2010.tar (host.robots.ox.ac.uk/pascal/VOC/voc2010) and the PASCAL-Context annotations "
       "from cs.stanford.edu/~roozbeh/pascal-context")
_VOC = ("VOCtrainval_11-May-2012.tar (host.robots.ox.ac.uk/pascal/VOC/voc2012) and SegmentationClassAug "
        "(SBD-augmented labels)")

BENCHMARKS: Dict[str, Benchmark] = {
    "coco_2017_train_stuff_all_sem_seg": Benchmark(
        "coco/images/train2017", "coco/annotations_detectron2/train2017", ".png", 255,
        "coco", "datasets/prepare_coco_stuff.py", _COCO),
    "coco_2017_test_stuff_all_sem_seg": Benchmark(
        "coco/images/val2017", "coco/annotations_detectron2/val2017", ".png", 255,
        "coco", "datasets/prepare_coco_stuff.py", _COCO),
    "ade20k_150_test_sem_seg": Benchmark(
        "ADEChallengeData2016/images/validation",
        "ADEChallengeData2016/annotations_detectron2/validation", ".png", 255,
        "ade150", "datasets/prepare_ade150.py", _ADE150),
    "ade20k_full_sem_seg_freq_val_all": Benchmark(
        "ADE20K_2021_17_01/images_detectron2/validation",
        "ADE20K_2021_17_01/annotations_detectron2/validation", ".tif", 65535,
        "ade847", "datasets/prepare_ade847.py", _ADE847),
    "context_59_test_sem_seg": Benchmark(
        "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc59_val",
        ".png", 255, "pc59", "datasets/prepare_pc59.py", _PC + " (trainval_merged.json)"),
    "context_459_test_sem_seg": Benchmark(
        "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc459_val",
        ".tif", 459, "pc459", "datasets/prepare_pc459.py", _PC + " (trainval.tar.gz)"),
    "voc_2012_test_sem_seg": Benchmark(
        "VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2/val",
        ".png", 255, "voc20", "datasets/prepare_voc.py", _VOC),
    "voc_2012_test_background_sem_seg": Benchmark(
        "VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2_bg/val",
        ".png", 255, "voc20b", "datasets/prepare_voc.py", _VOC,
        evaluator_type="sem_seg_background", dataset_classes="voc20+background"),
}

_CUSTOM: Dict[str, dict] = {}  # name -> register_custom_dataset arguments


def dataset_root() -> Path:
    """Root of the builtin benchmarks: $DETECTRON2_DATASETS, default ./datasets."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def _stuff_classes(bench: Benchmark) -> List[str]:
    if bench.dataset_classes == "voc20+background":
        return load_class_names("voc20") + ["background"]
    return load_class_names(bench.class_list)


def _has_file_with_ext(folder: Path, ext: str) -> bool:
    with os.scandir(folder) as entries:
        return any(e.name.lower().endswith(ext) for e in entries)


def _check_benchmark(name: str, bench: Benchmark, root: Path) -> None:
    hint = f"download {bench.download} and run python {bench.prepare} (see datasets/README.md)"
    for folder in (root / bench.image_dir, root / bench.label_dir):
        if not folder.is_dir():
            raise DatasetNotFoundError(f"{folder} not found (dataset {name}): {hint}")
    label_dir = root / bench.label_dir
    if not _has_file_with_ext(label_dir, bench.label_ext):
        raise DatasetNotFoundError(
            f"{label_dir} holds no {bench.label_ext} labels (dataset {name}): {hint}")


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> Dict[str, Path]:
    """{file stem: path} of the files in `folder` with one of `extensions` (case-insensitive)."""
    with os.scandir(folder) as entries:
        return {Path(e.name).stem: folder / e.name for e in entries
                if e.is_file() and e.name.lower().endswith(tuple(extensions))}


def _describe(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def pair_images_and_labels(image_dir: Path, label_dir: Path, image_exts: Sequence[str],
                           label_exts: Sequence[str], dataset: str,
                           warn_unlabeled_images: bool) -> List[dict]:
    """Records {"file_name", "sem_seg_file_name"} for every label with an image of the same stem.

    Labels without an image are skipped with a warning; images without a label too when
    `warn_unlabeled_images` (builtin benchmarks label only part of a shared image folder).
    """
    images = _files_by_stem(image_dir, image_exts)
    labels = _files_by_stem(label_dir, label_exts)
    orphans = sorted(labels[s].name for s in labels.keys() - images.keys())
    if orphans:
        logger.warning(f"dataset {dataset}: {len(orphans)} label(s) in {label_dir} have no image "
                       f"in {image_dir}, skipped: {_describe(orphans)}")
    unlabeled = sorted(images[s].name for s in images.keys() - labels.keys())
    if unlabeled and warn_unlabeled_images:
        logger.warning(f"dataset {dataset}: {len(unlabeled)} image(s) in {image_dir} have no "
                       f"label in {label_dir}, skipped: {_describe(unlabeled)}")
    return [{"file_name": str(images[s]), "sem_seg_file_name": str(labels[s])}
            for s in sorted(labels.keys() & images.keys())]


def load_benchmark(name: str, root: Optional[Path] = None) -> List[dict]:
    """Dataset dicts of builtin benchmark `name` (reads the disk)."""
    bench = BENCHMARKS[name]
    root = dataset_root() if root is None else Path(root)
    _check_benchmark(name, bench, root)
    records = pair_images_and_labels(root / bench.image_dir, root / bench.label_dir,
                                     (bench.image_ext,), (bench.label_ext,), name, False)
    if not records:
        raise DatasetError(f"dataset {name}: no label in {root / bench.label_dir} has an image "
                           f"in {root / bench.image_dir}; run python {bench.prepare}")
    return records


def _replace_registration(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_builtin_datasets(root: Optional[str] = None) -> None:
    """(Re-)register the builtin benchmarks under `root` (default: `dataset_root()`).

    Touches no file under the root; shipped class lists are read.
    """
    root = dataset_root() if root is None else Path(root)
    for name, bench in BENCHMARKS.items():
        _replace_registration(name)
        DatasetCatalog.register(name, lambda name=name, root=root: load_benchmark(name, root))
        classes = _stuff_classes(bench)
        MetadataCatalog.get(name).set(
            stuff_classes=classes,
            stuff_colors=class_colors(len(classes)).tolist(),
            prompt_classes=load_class_names(bench.class_list),
            class_list=bench.class_list,
            ignore_label=bench.ignore_label,
            evaluator_type=bench.evaluator_type,
            image_root=str(root / bench.image_dir),
            sem_seg_root=str(root / bench.label_dir),
            prepare_script=bench.prepare,
            dataset_root=str(root),
        )


def read_label(path: str) -> np.ndarray:
    """Label map of `path` (PNG or TIFF, 8 or 16 bit) as an (H, W) int64 array."""
    with Image.open(path) as im:
        label = np.asarray(im)
    if label.ndim != 2:
        raise DatasetError(f"{path}: a label must be a single-channel image, got shape "
                           f"{label.shape}")
    return label.astype(np.int64)


def check_pair(record: dict, num_classes: int, ignore_label: int) -> Tuple[Optional[str], List[int]]:
    """Problems of one image/label pair: (size message or None, sorted ids outside the classes)."""
    with Image.open(record["file_name"]) as im:
        image_w, image_h = im.size
    label = read_label(record["sem_seg_file_name"])
    if label.shape != (image_h, image_w):
        return (f"label {record['sem_seg_file_name']} is {label.shape[0]}x{label.shape[1]} "
                f"(h x w) but image {record['file_name']} is {image_h}x{image_w}"), []
    ids = np.unique(label)
    bad = ids[((ids < 0) | (ids >= num_classes)) & (ids != ignore_label)]
    return None, bad.tolist()


CORRUPT_CHOICES = ("error", "skip")  # DATALOADER.CORRUPT_LABELS


def unreadable(record: dict) -> Optional[str]:
    """'<file>: <reason>' when the label cannot be decoded or the image's header read, else None."""
    for key, read in (("sem_seg_file_name", read_label), ("file_name", lambda p: Image.open(p).close())):
        try:
            read(record[key])
        except DatasetError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            return f"{record[key]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def load_custom_dataset(name: str, image_dir: str, label_dir: str, classes_json: str,
                        ignore_label: int = 255, validate: bool = True, corrupt: str = "error") -> List[dict]:
    """Dataset dicts of a folder of images and a folder of labels with the same stems.

    With `validate`, every pair is read and checked (see the module docstring for what is
    skipped and what is fatal; `corrupt` "error" or "skip" says what an unreadable file is);
    records then carry "height" and "width".
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetNotFoundError(f"{folder} not found (custom dataset {name})")
    records = pair_images_and_labels(image_dir, label_dir, IMAGE_EXTENSIONS, LABEL_EXTENSIONS,
                                     name, True)
    if validate:
        num_classes = len(load_class_names(classes_json))
        kept, out_of_range, broken = [], [], []
        for record in records:
            problem = unreadable(record)
            if problem:
                broken.append(problem)
                continue
            size_problem, bad_ids = check_pair(record, num_classes, ignore_label)
            if size_problem:
                logger.warning(f"dataset {name}: {size_problem}; skipped")
                continue
            if bad_ids:
                out_of_range.append(f"{record['sem_seg_file_name']} has {bad_ids}")
                continue
            with Image.open(record["file_name"]) as im:
                record["width"], record["height"] = im.size
            kept.append(record)
        if out_of_range:
            raise DatasetError(
                f"dataset {name}: label ids outside the {num_classes} classes of {classes_json} "
                f"(valid 0..{num_classes - 1}, ignore {ignore_label}): "
                f"{_describe(out_of_range)}; fix the class list or the labels")
        if broken and corrupt == "skip":
            logger.warning(f"dataset {name}: {len(broken)} corrupt or unreadable file(s) skipped "
                           f"(DATALOADER.CORRUPT_LABELS skip): {_describe(broken)}")
        elif broken:
            raise DatasetError(f"dataset {name}: {len(broken)} corrupt or unreadable file(s): {_describe(broken)}; "
                               "replace them, or set DATALOADER.CORRUPT_LABELS skip to train without them")
        records = kept
    if not records:
        raise DatasetError(f"dataset {name}: no usable image/label pair in {image_dir} and "
                           f"{label_dir} (labels are matched to images by file stem)")
    return records


def register_custom_dataset(name: str, image_dir: str, label_dir: str, classes_json: str,
                            ignore_label: int = 255, validate: bool = True,
                            evaluator_type: str = "sem_seg", corrupt: str = "error") -> None:
    """Register a folder of images + a folder of label maps (same stems) as dataset `name`.

    `classes_json` is a JSON list of class names (or a .txt, one per line, or a shipped list
    name such as "ade150"); label value i is class i, `ignore_label` is not evaluated or
    trained on. `evaluator_type` "sem_seg_background" counts predictions beyond the last
    class as the last class (see catseg.evaluation). Registering the same name again
    replaces the earlier registration. `corrupt`: "error" or "skip" (see the module docstring).
    """
    if name in BENCHMARKS:
        raise ValueError(f"{name} is a builtin benchmark name; choose another name")
    if corrupt not in CORRUPT_CHOICES:
        raise DatasetError(f"DATALOADER.CORRUPT_LABELS {corrupt!r}: expected one of {', '.join(CORRUPT_CHOICES)}")
    classes = load_class_names(classes_json)
    class_json_path = str(resolve_class_list(classes_json))
    _replace_registration(name)
    args = dict(image_dir=str(image_dir), label_dir=str(label_dir), classes_json=class_json_path,
                ignore_label=int(ignore_label), validate=validate, corrupt=corrupt)
    _CUSTOM[name] = args
    DatasetCatalog.register(name, lambda: load_custom_dataset(name, **args))
    MetadataCatalog.get(name).set(
        stuff_classes=classes,
        stuff_colors=class_colors(len(classes)).tolist(),
        prompt_classes=classes,
        class_list=class_json_path,
        ignore_label=int(ignore_label),
        evaluator_type=evaluator_type,
        image_root=str(image_dir),
        sem_seg_root=str(label_dir),
    )


def parse_custom_spec(spec: str) -> dict:
    """Arguments of `register_custom_dataset` from "name:image_dir:label_dir:classes.json[:ignore]"."""
    parts = spec.split(":")
    if len(parts) not in (4, 5) or not all(parts):
        raise ValueError(f"DATASETS.CUSTOM entry {spec!r}: expected "
                         "'name:image_dir:label_dir:classes.json' or '...:classes.json:ignore'")
    args = dict(name=parts[0], image_dir=parts[1], label_dir=parts[2], classes_json=parts[3])
    if len(parts) == 5:
        if not parts[4].isdigit():
            raise ValueError(f"DATASETS.CUSTOM entry {spec!r}: ignore value {parts[4]!r} "
                             "is not a non-negative integer")
        args["ignore_label"] = int(parts[4])
    return args


def register_from_config(cfg) -> List[str]:
    """Register every DATASETS.CUSTOM entry of `cfg`; returns their names.

    A malformed entry or an unreadable class list raises DatasetError (one line)."""
    names = []
    for spec in cfg.DATASETS.CUSTOM:
        try:
            args = parse_custom_spec(spec)
            register_custom_dataset(**args, corrupt=cfg.DATALOADER.CORRUPT_LABELS)
        except (ValueError, FileNotFoundError) as e:
            if isinstance(e, CatsegError):
                raise
            raise DatasetError(f"DATASETS.CUSTOM: {e}") from None
        names.append(args["name"])
    return names


def check_dataset_exists(name: str) -> None:
    """Raise DatasetNotFoundError (one line: missing path + how to get it) if `name`'s folders
    are missing. Builtin benchmarks, custom datasets, and any dataset whose metadata has
    image_root / sem_seg_root are checked; other registered datasets pass."""
    if name in BENCHMARKS:
        _check_benchmark(name, BENCHMARKS[name], Path(MetadataCatalog.get(name).dataset_root))
        return
    if name not in DatasetCatalog.list():
        raise KeyError(f"dataset {name!r} is not registered (builtin: {', '.join(BENCHMARKS)}; "
                       "custom datasets: DATASETS.CUSTOM)")
    meta = MetadataCatalog.get(name)
    hint = "(custom dataset: check DATASETS.CUSTOM)" if name in _CUSTOM else ""
    for key in ("image_root", "sem_seg_root"):
        folder = meta.get(key)
        if folder is not None and not Path(folder).is_dir():
            raise DatasetNotFoundError(f"{folder} not found (dataset {name}) {hint}".rstrip())


register_builtin_datasets()
