"""CLIP through open_clip: model selection and weights.

The dense image pass, the release options and fine-tuning live in `clip_encoder.py`; prompt
templates and class text embeddings in `text.py`.

Notation: B images, T classes, P prompt templates, C embedding channels, h x w patch grid.
"""
import logging
from pathlib import Path
from typing import Tuple

import open_clip
import torch

from ..errors import WeightsError

logger = logging.getLogger(__name__)

# Architectures shipped with catseg (tiny ones for tests and the quick-start).
open_clip.add_model_config(Path(__file__).with_name("clip_configs"))

# Official CAT-Seg CLIP names -> (open_clip architecture, pretrained tag, forced image size).
OFFICIAL_CLIP_MODELS = {
    "ViT-B/16": ("ViT-B-16-quickgelu", "openai", None),
    "ViT-L/14@336px": ("ViT-L-14-336-quickgelu", "openai", None),
    "ViT-H": ("ViT-H-14", "laion2b_s32b_b79k", 336),
    "ViT-G": ("ViT-bigG-14", "laion2b_s39b_b160k", 336),
}

def resolve_clip(pretrained: str, model_override: str = "", weights: str = "pretrained"):
    """Which open_clip model to build and which weights to put in it.

    Args:
        pretrained: an official name ("ViT-B/16", ...) or "open_clip:ARCH[:TAG]".
        model_override: an open_clip architecture that replaces the one implied by `pretrained`.
        weights: "pretrained" (the tag), "random", or a local checkpoint path.
    Returns:
        (architecture, weights source: tag, path or None for random, forced image size or None)
    """
    if pretrained in OFFICIAL_CLIP_MODELS:
        arch, tag, image_size = OFFICIAL_CLIP_MODELS[pretrained]
    elif pretrained.startswith("open_clip:"):
        parts = pretrained.split(":")
        arch, tag, image_size = parts[1], (parts[2] if len(parts) > 2 else None), None
    else:
        raise ValueError(
            f"CLIP_PRETRAINED {pretrained!r}: use one of {sorted(OFFICIAL_CLIP_MODELS)} "
            "or 'open_clip:ARCH[:TAG]' (put a local checkpoint path in CLIP_WEIGHTS)"
        )
    arch = model_override or arch
    if weights == "random":
        source = None
    elif weights == "pretrained":
        source = tag
    else:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"CLIP_WEIGHTS: no checkpoint file at {weights}")
        source = weights
    return arch, source, image_size


def default_clip_resolution(pretrained: str) -> Tuple[int, int]:
    """Official CLIP input size: 384x384 for ViT-B/16, 336x336 otherwise."""
    side = 384 if pretrained == "ViT-B/16" else 336
    return side, side


def clip_weights_file(arch: str, tag: str) -> str:
    """Where open_clip gets the weights `tag` of `arch` (a hub repository or a URL), for messages."""
    pretrained = open_clip.get_pretrained_cfg(arch, tag) or {}
    return (f"https://huggingface.co/{pretrained['hf_hub'].rstrip('/')}" if pretrained.get("hf_hub")
            else pretrained.get("url") or f"open_clip's {arch} weights {tag!r}")


def build_clip(pretrained: str, model_override: str = "", weights: str = "pretrained", seed: int = 0):
    """Build the open_clip model and its tokenizer. Random weights are seeded for reproducibility.

    The model stays where its tensors were created (device=None: open_clip moves nothing), so
    catseg/modeling/build.py can create the large ones on the meta device. Pretrained weights that cannot
    be had (no network, unknown tag) raise a one-line WeightsError naming the file and the way to
    give it."""
    arch, source, image_size = resolve_clip(pretrained, model_override, weights)
    kwargs = {"force_image_size": image_size} if image_size else {}
    kwargs["device"] = None
    if source is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(arch, pretrained=None, **kwargs)
    else:
        logger.info("Loading CLIP %s with weights %s", arch, source)
        try:
            model = open_clip.create_model(arch, pretrained=source, require_pretrained=True, **kwargs)
        except Exception as e:  # offline, unreachable, unknown tag, unreadable file: all end the same way
            raise WeightsError(
                f"cannot get the CLIP weights {clip_weights_file(arch, source)} ({type(e).__name__}): download them "
                "and set MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS to the file's path, or give MODEL.WEIGHTS a full CAT-Seg "
                "checkpoint (it holds CLIP)") from None
    return model.float(), open_clip.get_tokenizer(arch)
