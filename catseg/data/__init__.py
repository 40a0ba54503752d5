"""Datasets (builtin benchmarks, custom folders) and the training mapper."""
