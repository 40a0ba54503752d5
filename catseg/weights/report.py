"""How a checkpoint's state_dict differs from a model's: one readable summary (missing,
unexpected and wrong-shape keys, grouped by module), one error type for a strict load."""
from dataclasses import dataclass, field
from typing import Iterable, List, Sequence, Tuple

from fvcore.common.checkpoint import _group_checkpoint_keys, _group_to_str

from ..errors import WeightsError


class CheckpointMismatchError(WeightsError, RuntimeError):
    """The checkpoint's keys or shapes do not match the model (MODEL.CHECKPOINT_STRICT)."""


@dataclass
class LoadReport:
    """What happened when a checkpoint was loaded: key lists, one per outcome."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "shape_mismatch"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}): " + ", ".join(sorted(keys)))
        return "\n".join(lines)


def group_keys(keys: Iterable[str], limit: int) -> List[str]:
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
        lines += [f"    {line}" for line in group_keys(missing, limit)]
    if unexpected:
        lines.append("  unexpected (in the checkpoint, not in the model; ignored):")
        lines += [f"    {line}" for line in group_keys(unexpected, limit)]
    if wrong_shapes:
        lines.append("  wrong shape (checkpoint vs model; not loaded):")
        lines += [f"    {k}: {tuple(c)} vs {tuple(m)}" for k, c, m in wrong_shapes[:limit]]
    lines.append("  (set MODEL.CHECKPOINT_STRICT True to make this an error)")
    return "\n".join(lines)
