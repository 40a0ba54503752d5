"""Class lists: shipped copies equal the reference, and the ways a list can be named."""
import json
from pathlib import Path

import pytest

from catseg.data.class_names import CLASS_NAMES_DIR, load_class_names, shipped_class_lists, synonyms

LISTS = {"coco": 171, "ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459, "voc20": 20, "voc20b": 59}


def test_shipped_copies_equal_reference(shared):
    reference = shared / "reference" / "class_names"
    assert shipped_class_lists() == sorted(LISTS)
    for name, count in LISTS.items():
        assert (CLASS_NAMES_DIR / f"{name}.json").read_bytes() == (reference / f"{name}.json").read_bytes()
        assert len(load_class_names(name)) == count


def test_shipped_id_tables_equal_reference(shared):
    ids = Path(CLASS_NAMES_DIR).parent / "ids"
    for name in ["coco_stuff_171_ids.json", "ade20k_847_ids.json", "pascal_context_59_raw_ids.json",
                 "pascalcontext_val.txt"]:
        assert (ids / name).read_bytes() == (shared / "reference" / "datasets" / name).read_bytes()


def test_spellings_of_a_shipped_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # independent of the working directory
    expected = json.loads((CLASS_NAMES_DIR / "ade150.json").read_text())
    for spec in ["ade150", "ade150.json", "datasets/ade150.json"]:
        assert load_class_names(spec) == expected
    assert load_class_names("voc20b")[:20] == load_class_names("voc20")


def test_user_files(tmp_path):
    (tmp_path / "mine.json").write_text('["cat", "sky, heaven"]')
    (tmp_path / "mine.txt").write_text("cat\n\nsky, heaven\n")
    assert load_class_names(str(tmp_path / "mine.json")) == ["cat", "sky, heaven"]
    assert load_class_names(str(tmp_path / "mine.txt")) == ["cat", "sky, heaven"]
    (tmp_path / "ade150.json").write_text('["only"]')  # an existing file wins over the shipped list
    assert load_class_names(str(tmp_path / "ade150.json")) == ["only"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'nope.json' not found: .*shipped lists ade150, ade847"):
        load_class_names("nope.json")
    with pytest.raises(FileNotFoundError):
        load_class_names(str(tmp_path / "ade150.json"))  # a missing path is not a shipped name
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="bad.json: a class-list JSON must be a list of strings"):
        load_class_names(str(tmp_path / "bad.json"))


def test_synonyms_split_at_comma_space():
    assert synonyms("sky") == ["sky"]
    assert synonyms("sky, heaven") == ["sky", "heaven"]
    assert synonyms("tv, monitor, screen") == ["tv", "monitor", "screen"]
    assert sum(len(synonyms(n)) for n in load_class_names("ade847")) > 847  # ade847 lists synonyms
