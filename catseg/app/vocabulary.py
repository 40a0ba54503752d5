"""User vocabularies: parsing "cat, kitten; sky" strings and cleaning class-name lists.

A vocabulary is a list of class names, one per output class id; a name containing ", " lists
synonyms of one class ("cat, kitten"), whose embeddings are averaged (as in the benchmarks'
class lists).
"""
import warnings
from collections import Counter
from typing import List, Sequence

from ..data.class_names import SYNONYM_SEPARATOR, load_class_names


class EmptyVocabularyError(ValueError):
    """No class name left to segment with."""


def normalize_name(name: str) -> str:
    """Whitespace collapsed; synonyms separated by exactly ", " (empty synonyms dropped)."""
    parts = (" ".join(s.split()) for s in str(name).split(","))
    return SYNONYM_SEPARATOR.join(s for s in parts if s)


def clean_vocabulary(names: Sequence[str]) -> List[str]:
    """Normalised names, empty ones dropped, duplicates (ignoring case) removed with a warning,
    first occurrence kept. Raises EmptyVocabularyError when nothing is left."""
    if isinstance(names, str):
        raise TypeError("a vocabulary is a list of class names; use parse_vocabulary('a; b') for a string")
    normalized = [n for n in (normalize_name(name) for name in names) if n]
    if not normalized:
        raise EmptyVocabularyError("empty vocabulary: give at least one class name "
                                   "(e.g. --vocab \"cat; dog, puppy; sky\")")
    kept, seen = [], set()
    for name in normalized:
        if name.casefold() not in seen:
            seen.add(name.casefold())
            kept.append(name)
    if len(kept) < len(normalized):
        counts = Counter(n.casefold() for n in normalized)
        repeated = ", ".join(f"{n!r} x{counts[n.casefold()]}" for n in kept if counts[n.casefold()] > 1)
        warnings.warn(f"duplicate class names removed (first kept): {repeated}", UserWarning, stacklevel=2)
    return kept


def parse_vocabulary(text: str) -> List[str]:
    """'cat, kitten; sky' -> ['cat, kitten', 'sky']: ';' separates classes, ',' synonyms."""
    return clean_vocabulary(text.split(";"))


def read_vocabulary_file(spec: str) -> List[str]:
    """Class names from a .json list or a .txt file (one class per line), or a shipped list
    ("ade150", ...; see catseg.data.class_names)."""
    try:
        names = load_class_names(spec)
    except ValueError as e:
        if "empty" in str(e):
            raise EmptyVocabularyError(f"empty vocabulary in {spec}") from None
        raise
    return clean_vocabulary(names)
