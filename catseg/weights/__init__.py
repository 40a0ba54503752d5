"""Weights: the one reader of weight files (files.py), the mismatch report (report.py), the
checkpointer (checkpointer.py), backbone checkpoints and their key conversion (backbone.py,
convert.py) and ImageNet backbone weights by name (pretrained.py). Nothing here imports the
model code: the architectures are told apart by name."""
