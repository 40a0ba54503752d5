"""Helpers shared by the datasets/prepare_*.py scripts (not a script itself).

Every script: checks its inputs before converting (one message naming the missing file or
folder and where the dataset is obtained), converts with a progress bar, skips outputs that
already exist (files are written under a temporary name and renamed, so an interrupted run
leaves no half-written output), and checks the number of outputs against the official count
at the end (exit status 1 on a mismatch). `--expected N` (or `SPLIT=N`) replaces the official
count, e.g. for a subset; `--no-count-check` skips the check.
"""
import argparse
import json
import os
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm


class PrepareError(Exception):
    """An input is missing or wrong; the message says what to do."""


def ids_dir() -> Path:
    """The id tables shipped in the catseg package (found without importing catseg)."""
    spec = find_spec("catseg")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "data" / "ids"
    return Path(__file__).resolve().parents[1] / "catseg" / "data" / "ids"


def load_ids_json(name: str):
    """Content of a shipped id table, e.g. load_ids_json("coco_stuff_171_ids.json")."""
    return json.loads((ids_dir() / name).read_text())


def lookup_table(mapping: Dict[int, int], fill: int, dtype) -> np.ndarray:
    """1-D array t with t[raw] = mapping[raw], `fill` elsewhere, for raw in 0..max(mapping)."""
    table = np.full(max(mapping) + 1, fill, dtype=dtype)
    for raw, new in mapping.items():
        table[raw] = new
    return table


def apply_table(raw: np.ndarray, table: np.ndarray, fill: int) -> np.ndarray:
    """table[raw] where raw indexes the table, `fill` for raw values outside it."""
    inside = (raw >= 0) & (raw < len(table))
    out = np.full(raw.shape, fill, dtype=table.dtype)
    out[inside] = table[raw[inside]]
    return out


def default_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def make_parser(script: str, description: str, counts: Dict[str, int]) -> argparse.ArgumentParser:
    """Argument parser of `script` (its __file__) with --root, --expected, --no-count-check."""
    official = ", ".join(f"{k}={v}" for k, v in counts.items())
    parser = argparse.ArgumentParser(prog=Path(script).name, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=default_root(),
                        help="dataset root (default: $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--expected", nargs="+", default=[], metavar="[SPLIT=]N",
                        help=f"expected output counts instead of the official ones ({official})")
    parser.add_argument("--no-count-check", action="store_true",
                        help="do not compare the output counts with the expected ones")
    return parser


def expected_counts(values: Sequence[str], official: Dict[str, int]) -> Dict[str, int]:
    """Official counts updated by --expected values ("N" when there is one split, or "SPLIT=N")."""
    counts = dict(official)
    for value in values:
        split, _, number = value.rpartition("=")
        if not split:
            if len(official) != 1:
                raise PrepareError(f"--expected {value}: give SPLIT=N, SPLIT one of "
                                   f"{', '.join(official)}")
            split = next(iter(official))
        if split not in official or not number.isdigit():
            raise PrepareError(f"--expected {value}: expected [SPLIT=]N with SPLIT one of "
                               f"{', '.join(official)}")
        counts[split] = int(number)
    return counts


def require(paths: Iterable[Path], source: str) -> None:
    """Stop with one message on the first missing path, saying where the data comes from."""
    for path in paths:
        if not path.exists():
            raise PrepareError(f"{path} not found: {source}")


def require_all(paths: Sequence[Path], source: str) -> None:
    """Like `require` for many files (e.g. one per image); the message counts the missing."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise PrepareError(f"{missing[0]} not found{more}: {source}")


def _partial_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def write_atomic(path: Path, save: Callable[[Path], None]) -> None:
    """Write `path` through save(temporary path in the same folder), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_path(path)
    save(tmp)
    os.replace(tmp, path)


def save_png(path: Path, label: np.ndarray) -> None:
    """uint8 (H, W) label map as PNG."""
    write_atomic(path, lambda p: Image.fromarray(label.astype(np.uint8)).save(p))


def save_tiff(path: Path, label: np.ndarray) -> None:
    """uint16 (H, W) label map as a 16-bit TIFF."""
    write_atomic(path, lambda p: Image.fromarray(label.astype(np.uint16)).save(p))


def save_image_cv2(path: Path, image: np.ndarray) -> None:
    """(H, W, 3) BGR uint8 image, format from the file extension."""
    def save(p):
        if not cv2.imwrite(str(p), image):
            raise PrepareError(f"could not write {path}")
    write_atomic(path, save)


def read_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def run_jobs(jobs: List[Tuple[List[Path], Callable[[], None]]], desc: str) -> None:
    """Run each (outputs, convert) job whose outputs do not all exist yet, with a progress bar."""
    done = 0
    todo = []
    for outputs, convert in jobs:
        if outputs and all(p.exists() for p in outputs):
            done += 1
        else:
            todo.append(convert)
    if done:
        print(f"{desc}: {done} already converted, skipped", file=sys.stderr)
    for convert in tqdm(todo, desc=desc, unit="img", file=sys.stderr):
        convert()


def count_files(folder: Path, suffix: str) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for name in os.listdir(folder)
               if name.endswith(suffix) and not name.startswith("."))


def check_counts(found: Dict[str, int], expected: Dict[str, int], what: str) -> List[str]:
    """Messages for every split whose count differs from the expected one."""
    return [f"{split}: expected {expected[split]} {what}, found {found[split]} (incomplete "
            f"download? pass --expected {split}={found[split]} for a subset, or --no-count-check)"
            for split in expected if found[split] != expected[split]]


def run_main(body: Callable[[argparse.Namespace], Dict[str, int]], parser: argparse.ArgumentParser,
             official: Dict[str, int], what: str, argv: Optional[Sequence[str]]) -> int:
    """Parse argv, run body(args) -> {split: output count}, check the counts; exit status."""
    args = parser.parse_args(argv)
    name = parser.prog
    try:
        expected = expected_counts(args.expected, official)
        found = body(args)
    except PrepareError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    for split, count in found.items():
        print(f"{split}: {count} {what}")
    if args.no_count_check:
        return 0
    problems = check_counts(found, expected, what)
    for problem in problems:
        print(f"{name}: error: {problem}", file=sys.stderr)
    return 1 if problems else 0
