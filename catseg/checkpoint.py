"""Checkpoints: atomic saves, and loading official CAT-Seg checkpoints with one mismatch report.

Saving writes the checkpoint (and the `last_checkpoint` tag) to a temporary file in the same
folder, flushes it to disk and renames it over the target with `os.replace`, so a crash during
a save leaves the previous checkpoint and the tag pointing at it intact.

Loading accepts detectron2 / official CAT-Seg files ({"model": state_dict, ...}). Every
missing key, unexpected key and shape mismatch is reported together in one readable summary
(`format_mismatch_report`); with `strict` (MODEL.CHECKPOINT_STRICT) the summary is raised as
`CheckpointMismatchError` instead of logged. A missing or unreadable (corrupt, truncated, not a
checkpoint) file raises `catseg.errors.WeightsError` naming the file.
"""
import os
import tempfile
from typing import Iterable, List, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys, _group_checkpoint_keys, _group_to_str

from .errors import WeightsError


class CheckpointMismatchError(WeightsError, RuntimeError):
    """The checkpoint's keys or shapes do not match the model (MODEL.CHECKPOINT_STRICT)."""


def atomic_write(path: str, write_fn, mode: str = "wb") -> None:
    """Call `write_fn(file)` on a temporary file next to `path`, then rename it to `path`.

    On any exception the temporary file is removed and `path` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _group_keys(keys: Iterable[str], limit: int) -> List[str]:
    """Keys grouped by parent module (fvcore's grouping): "a.b.{bias, weight}"; at most `limit` lines."""
    lines = [head + _group_to_str(leaves) for head, leaves in _group_checkpoint_keys(sorted(keys)).items()]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more modules"]
    return lines


def format_mismatch_report(source: str, missing: Sequence[str], unexpected: Sequence[str],
                           wrong_shapes: Sequence[Tuple[str, tuple, tuple]], limit: int = 20) -> str:
    """One readable summary of how a checkpoint's state_dict differs from the model's ("" if none)."""
    if not (missing or unexpected or wrong_shapes):
        return ""
    lines = [f"checkpoint {source} does not match the model: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(wrong_shapes)} wrong-shape keys"]
    if missing:
        lines.append("  missing (in the model, not in the checkpoint; left as initialised):")
        lines += [f"    {line}" for line in _group_keys(missing, limit)]
    if unexpected:
        lines.append("  unexpected (in the checkpoint, not in the model; ignored):")
        lines += [f"    {line}" for line in _group_keys(unexpected, limit)]
    if wrong_shapes:
        lines.append("  wrong shape (checkpoint vs model; not loaded):")
        lines += [f"    {k}: {tuple(c)} vs {tuple(m)}" for k, c, m in wrong_shapes[:limit]]
    lines.append("  (set MODEL.CHECKPOINT_STRICT True to make this an error)")
    return "\n".join(lines)


class CATSegCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and a single mismatch report on load."""

    def __init__(self, model, save_dir: str = "", *, strict: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict
        self._source = ""

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
        try:
            return super()._load_file(filename)
        except Exception as e:  # whatever torch.load / pickle raise on a file that is no checkpoint
            raise WeightsError(f"weights file {filename} is not a readable checkpoint: corrupt, truncated "
                               f"or another format (torch.load: {type(e).__name__})") from e

    def _log_incompatible_keys(self, incompatible) -> None:
        wrong_shape = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in _filter_reused_missing_keys(self.model, incompatible.missing_keys)
                   if k not in wrong_shape]
        report = format_mismatch_report(self._source, missing, incompatible.unexpected_keys,
                                        incompatible.incorrect_shapes)
        if not report:
            self.logger.info(f"Loaded {self._source}: all keys match (0 missing, 0 unexpected)")
        elif self.strict:
            raise CheckpointMismatchError(report)
        else:
            self.logger.warning(report)
