"""Datasets (builtin benchmarks, custom folders) and the training mapper."""
from . import datasets  # noqa: F401  (registers the builtin benchmarks; reads no dataset file)
