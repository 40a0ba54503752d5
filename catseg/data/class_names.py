"""Class-name lists: the benchmark lists shipped in the package, or a user's file.

A class list is a list of prompts, one per class; a name containing ", " lists synonyms
("sky, heaven"). Shipped lists (`catseg/data/class_names/*.json`, copies of the official
CAT-Seg prompts): coco (171), ade150, ade847, pc59, pc459, voc20, voc20b (59 names, the 20
VOC classes first).
"""
import json
from pathlib import Path
from typing import List

CLASS_NAMES_DIR = Path(__file__).resolve().parent / "class_names"
SYNONYM_SEPARATOR = ", "


def synonyms(name: str) -> List[str]:
    """The synonyms a class name lists: "sky, heaven" -> ["sky", "heaven"]."""
    return name.split(SYNONYM_SEPARATOR)


def shipped_class_lists() -> List[str]:
    """Names of the class lists shipped in the package (e.g. "ade150")."""
    return sorted(p.stem for p in CLASS_NAMES_DIR.glob("*.json"))


def resolve_class_list(spec: str) -> Path:
    """Path of the class list named by `spec`.

    `spec` is an existing file (JSON list, or .txt with one name per line), or a shipped list
    named like "ade150", "ade150.json" or the official configs' "datasets/ade150.json". An
    existing file wins over a shipped list of the same name.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    shipped = CLASS_NAMES_DIR / f"{name}.json"
    if shipped.is_file() and (len(path.parts) == 1 or path.parent.name == "datasets"):
        return shipped
    raise FileNotFoundError(
        f"class list {spec!r} not found: give an existing .json/.txt file or one of the "
        f"shipped lists {', '.join(shipped_class_lists())}"
    )


def parse_class_names(text: str, is_json: bool) -> List[str]:
    """Class names from the text of a JSON list of strings or of a one-name-per-line file."""
    if is_json:
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("a class-list JSON must be a list of strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError("the class list is empty")
    return names


def load_class_names(spec: str) -> List[str]:
    """Class names of `spec` (see `resolve_class_list`), e.g. load_class_names("ade150")."""
    path = resolve_class_list(spec)
    try:
        return parse_class_names(path.read_text(encoding="utf-8"), path.suffix.lower() != ".txt")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
