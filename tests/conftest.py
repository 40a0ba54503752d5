"""Shared test fixtures: where the reference folder is, and small helpers.

The shared reference folder is found through $CATSEG_SHARED (default: ../shared next to the
repository root). Tests that need it skip when it is absent, except under CI=true, where a
missing folder is a failure.
"""
import os
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Text-embedding cache of the test session: never the user's ~/.cache/catseg.
os.environ.setdefault("CATSEG_CACHE", tempfile.mkdtemp(prefix="catseg-test-cache-"))


def shared_dir() -> Path:
    return Path(os.environ.get("CATSEG_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared():
    """Path of the shared reference folder; fails under CI=true when it is missing."""
    path = shared_dir()
    if not (path / "reference").is_dir():
        msg = f"shared reference folder not found at {path} (set CATSEG_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture
def builtin_root():
    """Call with a folder to register the builtin benchmarks under it; restored afterwards."""
    from catseg.data.datasets import register_builtin_datasets
    yield lambda root: register_builtin_datasets(str(root))
    register_builtin_datasets()


@pytest.fixture
def registered_datasets():
    """Call with a dataset name registered by the test; it is unregistered afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    names = []
    yield names.append
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
