"""Checkpoints: atomic saves, and loading official CAT-Seg checkpoints with one mismatch report.

Saving writes the checkpoint (and the `last_checkpoint` tag) to a temporary file in the same
folder, flushes it to disk and renames it over the target with `os.replace`, so a crash during
a save leaves the previous checkpoint and the tag pointing at it intact.

Loading accepts detectron2 / official CAT-Seg files ({"model": state_dict, ...}). Every
missing key, unexpected key and shape mismatch is reported together in one readable summary
(`format_mismatch_report`); with `strict` (MODEL.CHECKPOINT_STRICT) the summary is raised as
`CheckpointMismatchError` instead of logged.

A checkpoint without a CAT-Seg head is a guidance-backbone initialisation (ImageNet weights:
the official detectron2 `.pkl` files, timm or torchvision checkpoints, `.safetensors` too): it
is converted to the backbone's key names (catseg/weights/convert.py) and the report
covers the backbone only (the head and CLIP keep their initialisation): tensors loaded, backbone
keys missing, the ImageNet network's parts the backbone does not build (classifier, later
stages: listed, not an error), any other checkpoint key (unexpected).
A missing or unreadable (corrupt, truncated, not a checkpoint) file raises
`catseg.errors.WeightsError` naming the file.
"""
import os
from typing import Iterable

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys

from ..atomic import atomic_write
from ..errors import WeightsError
from .convert import convert_backbone_state, expected_keys, is_backbone_only, layout_name, wrapper_keys
from .files import read_checkpoint
from .report import CheckpointMismatchError, format_mismatch_report, group_keys


class CheckpointReleaseError(CheckpointMismatchError):
    """The checkpoint belongs to the other CAT-Seg release than the config's model."""


# CAT-Seg releases, told apart by the top-level modules of their state_dicts.
RELEASES = {
    "v1": ("backbone.", "a v1 config: configs/vitl_swinb_384.yaml (L), configs/vitb_r101_384.yaml (B) "
                        "or a protocol config in configs/ or configs/vitb/"),
    "CVPR'24": ("upsample1.", "a CVPR'24 config: configs/cvpr24/vitl_336.yaml (L), configs/cvpr24/vitb_384.yaml (B) "
                              "or a protocol config in configs/cvpr24/ or configs/cvpr24/vitb/"),
}


def release_of(keys: Iterable[str]) -> str:
    """"v1", "CVPR'24" or "" (neither) from state_dict keys."""
    keys = list(keys)
    for release, (prefix, _) in RELEASES.items():
        if any(k.startswith(prefix) for k in keys):
            return release
    return ""


def check_release(source: str, checkpoint_keys: Iterable[str], model_keys: Iterable[str]) -> None:
    """One-line CheckpointReleaseError when a v1 checkpoint meets a CVPR'24 model or the reverse."""
    ours, theirs = release_of(model_keys), release_of(checkpoint_keys)
    if ours and theirs and ours != theirs:
        prefix = RELEASES[theirs][0]
        raise CheckpointReleaseError(
            f"{source} is a CAT-Seg {theirs} checkpoint ({prefix}* keys) but the config builds a CAT-Seg {ours} "
            f"model ({RELEASES[ours][0]}* keys): use {RELEASES[theirs][1]}")


class CATSegCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and a single mismatch report on load."""

    def __init__(self, model, save_dir: str = "", *, strict: bool = False, preloaded=None, **kwargs):
        """`preloaded`: the checkpoint dict of the file the next `load` names, already read (by
        catseg/modeling/build.py), used instead of reading the file again."""
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict
        self._preloaded = preloaded
        self._source = ""
        self._backbone_init = None  # backbone-only checkpoint: (layout name, surplus keys, other unused keys)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"),
                     lambda f: f.write(last_filename_basename), mode="w")

    def load(self, path: str, checkpointables=None):
        self._source = path
        if path and "://" not in path and not os.path.isfile(path):
            raise WeightsError(f"weights file {path} not found (MODEL.WEIGHTS)")
        return super().load(path, checkpointables)

    def _load_file(self, filename: str):
        if self._preloaded is not None:
            checkpoint, self._preloaded = self._preloaded, None
            return checkpoint
        return read_checkpoint(filename)

    def _load_model(self, checkpoint):
        """A backbone-only checkpoint is renamed to `backbone.*` keys first (Caffe2 files keep
        detectron2's own name-matching heuristics)."""
        state = checkpoint["model"]
        check_release(self._source, state.keys(), self.model.state_dict().keys())
        self._backbone_init = None
        if is_backbone_only(state) and hasattr(self.model, "backbone") and checkpoint.get("__author__") != "Caffe2":
            backbone = self.model.backbone
            converted, surplus, unexpected = convert_backbone_state(backbone, state)
            self._backbone_init = (layout_name(backbone, state), surplus, unexpected)
            checkpoint["model"] = {f"backbone.{k}": v for k, v in converted.items()}
            checkpoint["matching_heuristics"] = False
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible) -> None:
        wrong_shape = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in _filter_reused_missing_keys(self.model, incompatible.missing_keys)
                   if k not in wrong_shape]
        unexpected = list(incompatible.unexpected_keys)
        if self._backbone_init is not None:
            layout, surplus, other = self._backbone_init
            expected = {f"backbone.{k}" for k in expected_keys(self.model.backbone)}
            missing = [k for k in missing if k in expected]
            unexpected += other
            loaded = len(expected) - len(missing) - len(wrong_shape)
            lines = [f"Backbone initialised from {self._source} ({layout} layout): "
                     f"{loaded} of {len(expected)} backbone tensors loaded"]
            fresh = wrapper_keys(self.model.backbone)
            if fresh:
                lines.append(f"  kept at initialisation (in no ImageNet checkpoint): {', '.join(group_keys(fresh, 5))}")
            if surplus:
                lines.append(f"  not used (classifier, stages after the last output): {len(surplus)} tensors: "
                             f"{', '.join(group_keys(surplus, 3))}")
            self.logger.info("\n".join(lines))
        report = format_mismatch_report(self._source, missing, unexpected, incompatible.incorrect_shapes)
        if not report:
            self.logger.info(f"Loaded {self._source}: all keys match (0 missing, 0 unexpected)")
        elif self.strict:
            raise CheckpointMismatchError(report)
        else:
            self.logger.warning(report)
