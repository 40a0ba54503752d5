"""Checkpoints: atomic saves, and loading official CAT-Seg checkpoints with one mismatch report.

Saving writes the checkpoint (and the `last_checkpoint` tag) to a temporary file in the same
folder, flushes it to disk and renames it over the target with `os.replace`, so a crash during
a save leaves the previous checkpoint and the tag pointing at it intact.

Loading accepts detectron2 / official CAT-Seg files ({"model": state_dict, ...}). Every
missing key, unexpected key and shape mismatch is reported together in one readable summary
(`format_mismatch_report`); with `strict` (MODEL.CHECKPOINT_STRICT) the summary is raised as
`CheckpointMismatchError` instead of logged.
"""
import os
import tempfile
from typing import Iterable, List, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys, _group_checkpoint_keys, _group_to_str


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model (MODEL.CHECKPOINT_STRICT)."""


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
        return super().load(path, checkpointables)

    def _load_model(self, checkpoint):
        check_release(self._source, checkpoint["model"].keys(), self.model.state_dict().keys())
        return super()._load_model(checkpoint)

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
