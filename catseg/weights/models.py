"""The released CAT-Seg models by name: `--model NAME` picks the config and the weights.

| name          | release | config (shipped)           | weights (official link)                                   |
|---------------|---------|----------------------------|-----------------------------------------------------------|
| cvpr24-base   | CVPR'24 | cvpr24/vitb_384.yaml       | hf://spaces/hamacojr/CAT-Seg-weights/model_base.pth        |
| cvpr24-large  | CVPR'24 | cvpr24/vitl_336.yaml       | hf://spaces/hamacojr/CAT-Seg-weights/model_large.pth       |
| v1-base       | v1      | vitb_r101_384.yaml         | hf://hamacojr/CAT-Seg/model_final_base.pth                 |
| v1-large      | v1      | vitl_swinb_384.yaml        | hf://hamacojr/CAT-Seg/model_final_large.pth                |
| v1-huge       | v1      | vith_swinb_384.yaml        | hf://hamacojr/CAT-Seg/model_final_huge.pth                 |
| v1-giant      | v1      | vitg_swinb_384.yaml        | hf://hamacojr/CAT-Seg/model_final_giant.pth                |

The weights are downloaded on first use through huggingface_hub (catseg/weights/hub.py) and
taken from its cache afterwards. Published mIoU: the authors' papers (README "Which checkpoint
goes with which config"); blank where no number is published here.

More names: `$CATSEG_MODELS` may name a JSON file {"NAME": {"config": ..., "weights": ...,
"description": ...}} whose entries are added to the table (or replace one of the same name) —
e.g. your own fine-tuned models, or a mirror of the released files. `config` is a path or a
shipped config name; `weights` a path, an `hf://` name or a huggingface.co link.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..config import shipped_config
from ..errors import ConfigError
from .hub import parse_hub_name

MODELS_ENV = "CATSEG_MODELS"
BENCHMARKS = ("A-847", "PC-459", "A-150", "PC-59", "PAS-20", "PAS-20b")


@dataclass(frozen=True)
class ReleasedModel:
    name: str
    config: str  # a shipped config name (catseg.config.shipped_config) or a path
    weights: str  # hf:// name, huggingface.co link or local path
    description: str
    miou: Tuple[Optional[float], ...] = field(default=(None,) * len(BENCHMARKS))  # published, in BENCHMARKS order

    def config_path(self) -> str:
        path = Path(self.config).expanduser()
        return str(path if path.is_file() else shipped_config(self.config))


RELEASED_MODELS: Dict[str, ReleasedModel] = {m.name: m for m in [
    ReleasedModel("cvpr24-base", "cvpr24/vitb_384.yaml", "hf://spaces/hamacojr/CAT-Seg-weights/model_base.pth",
                  "CAT-Seg CVPR'24 (B): CLIP ViT-B/16", (12.0, 19.0, 31.8, 57.5, 94.6, 77.3)),
    ReleasedModel("cvpr24-large", "cvpr24/vitl_336.yaml", "hf://spaces/hamacojr/CAT-Seg-weights/model_large.pth",
                  "CAT-Seg CVPR'24 (L): CLIP ViT-L/14@336px", (16.0, 23.8, 37.9, 63.3, 97.0, 82.5)),
    ReleasedModel("v1-base", "vitb_r101_384.yaml", "hf://hamacojr/CAT-Seg/model_final_base.pth",
                  "CAT-Seg v1 (B): ResNet-101 + CLIP ViT-B/16", (8.4, 16.6, 27.2, 57.5, 93.7, 78.3)),
    ReleasedModel("v1-large", "vitl_swinb_384.yaml", "hf://hamacojr/CAT-Seg/model_final_large.pth",
                  "CAT-Seg v1 (L): Swin-B + CLIP ViT-L/14@336px", (10.8, 20.4, 31.5, 62.0, 96.6, 81.8)),
    ReleasedModel("v1-huge", "vith_swinb_384.yaml", "hf://hamacojr/CAT-Seg/model_final_huge.pth",
                  "CAT-Seg v1 (H): Swin-B + OpenCLIP ViT-H/14"),
    ReleasedModel("v1-giant", "vitg_swinb_384.yaml", "hf://hamacojr/CAT-Seg/model_final_giant.pth",
                  "CAT-Seg v1 (G): Swin-B + OpenCLIP ViT-bigG/14"),
]}


def model_table() -> Dict[str, ReleasedModel]:
    """RELEASED_MODELS with the entries of $CATSEG_MODELS added (see the module docstring)."""
    table = dict(RELEASED_MODELS)
    extra = os.environ.get(MODELS_ENV, "")
    if not extra:
        return table
    try:
        entries = json.loads(Path(extra).read_text(encoding="utf-8"))
        for name, entry in entries.items():
            table[name] = ReleasedModel(name, entry["config"], entry["weights"], entry.get("description", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{MODELS_ENV}={extra}: not a JSON file of {{name: {{config, weights}}}} "
                          f"({type(e).__name__})") from None
    return table


def released_model(name: str) -> ReleasedModel:
    """The model called `name`; ConfigError listing the names otherwise."""
    table = model_table()
    if name not in table:
        raise ConfigError(f"--model {name}: unknown model; one of {', '.join(table)} (--list-models)")
    return table[name]


def cached_size(weights: str) -> Optional[int]:
    """Bytes of the weights file when it is on this machine (local, or in the hub cache), else None."""
    hub_file = parse_hub_name(weights)
    if hub_file is None:
        return os.path.getsize(weights) if os.path.isfile(weights) else None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(hub_file.repo_id, hub_file.filename, revision=hub_file.revision,
                                  repo_type=hub_file.repo_type)
    return os.path.getsize(path) if isinstance(path, str) and os.path.isfile(path) else None


def format_model_table() -> str:
    """The `--list-models` table: name, published mIoU per benchmark, download size (when the file
    is on this machine), config, weights."""
    header = ["model", *BENCHMARKS, "size", "config", "weights"]
    rows: List[List[str]] = []
    for m in model_table().values():
        size = cached_size(m.weights)
        rows.append([m.name, *("" if v is None else f"{v:.1f}" for v in m.miou),
                     f"{size / 2 ** 30:.2f} GiB" if size is not None else "", m.config, m.weights])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(lines + ["mIoU (%): published by the authors (blank: none published); size: the file on this "
                              "machine (blank: not downloaded yet)"])
