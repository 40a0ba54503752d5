"""CLIP through open_clip: model selection and weights, prompt templates, class text embeddings.

The dense image pass, the release options and fine-tuning live in `clip_encoder.py`.

Notation: B images, T classes, P prompt templates, C embedding channels, h x w patch grid.
"""
import logging
from pathlib import Path
from typing import List, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from ..data.class_names import synonyms as split_synonyms

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

PROMPT_TEMPLATES = {
    # open_clip's 80 ImageNet templates, in the CLIP paper's order.
    "imagenet": [template("{}") for template in OPENAI_IMAGENET_TEMPLATES],
    "imagenet_select": [
        "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
        "A photo of a {} in the scene",
    ],
    "single": ["A photo of a {} in the scene"],
    # The bare class name: no shared template words, so names stay far apart even under a
    # random text tower (used by the quick-start).
    "name": ["{}"],
}


def prompt_templates(ensemble_type: str) -> List[str]:
    """The template strings ("... {} ...") of a PROMPT_ENSEMBLE_TYPE."""
    if ensemble_type not in PROMPT_TEMPLATES:
        raise ValueError(f"PROMPT_ENSEMBLE_TYPE {ensemble_type!r}: expected one of {sorted(PROMPT_TEMPLATES)}")
    return list(PROMPT_TEMPLATES[ensemble_type])


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


def build_clip(pretrained: str, model_override: str = "", weights: str = "pretrained", seed: int = 0):
    """Build the open_clip model and its tokenizer. Random weights are seeded for reproducibility."""
    arch, source, image_size = resolve_clip(pretrained, model_override, weights)
    kwargs = {"force_image_size": image_size} if image_size else {}
    if source is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(arch, pretrained=None, **kwargs)
    else:
        logger.info("Loading CLIP %s with weights %s", arch, source)
        model = open_clip.create_model(arch, pretrained=source, **kwargs)
    return model.float(), open_clip.get_tokenizer(arch)


# TEXT_SYNONYMS: how a class name listing synonyms ("sky, heaven") becomes one embedding.
SYNONYM_MODES = ("average", "first")


def class_embeddings(
    clip_model: nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 1024,
    encode_fn=None,
    synonyms: str = "average",
) -> torch.Tensor:
    """Text embeddings of every (class, template) pair (differentiable; callers that need no
    gradients wrap it in no_grad).

    A name containing ", " lists synonyms. "average" (v1): their embeddings are L2-normalised,
    averaged per template and normalised again; "first" (CVPR'24): only the first synonym is used.
    Returns:
        (T, P, C) L2-normalised embeddings.
    """
    if synonyms not in SYNONYM_MODES:
        raise ValueError(f"TEXT_SYNONYMS {synonyms!r}: expected one of {SYNONYM_MODES}")
    encode_fn = encode_fn or (lambda tokens: clip_model.encode_text(tokens))
    texts, owners = [], []
    for name in class_names:
        names = split_synonyms(name)
        names = names[:1] if synonyms == "first" else names
        texts.extend(template.format(s) for template in templates for s in names)
        owners.append(len(names))
    device = next(clip_model.parameters()).device
    feats = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        feats.append(F.normalize(encode_fn(tokens).float(), dim=-1))
    feats = torch.cat(feats)
    out, start = [], 0
    for n_syn in owners:
        chunk = feats[start:start + n_syn * len(templates)].reshape(len(templates), n_syn, -1)
        start += n_syn * len(templates)
        out.append(F.normalize(chunk.mean(dim=1), dim=-1) if n_syn > 1 else chunk[:, 0])
    return torch.stack(out)
