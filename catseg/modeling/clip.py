"""CLIP through open_clip: model selection, dense image features, text embeddings, fine-tuning.

The CLIP module is a plain open_clip ``CLIP`` (OpenAI key layout), so official CAT-Seg
checkpoints load into it unchanged. Functions here take that module as their first argument.

Notation: B images, T classes, P prompt templates, C embedding channels, h x w patch grid.
"""
import logging
import math
from pathlib import Path
from typing import List, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from . import inplace

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


def add_visual_prompts(clip_model: nn.Module, depth: int, length: int) -> None:
    """Register `visual.transformer.prompt_tokens` (depth, length, width), Xavier-uniform."""
    if depth <= 0 or length <= 0:
        return
    width = clip_model.visual.transformer.width
    prompts = torch.empty(depth, length, width)
    nn.init.xavier_uniform_(prompts)
    clip_model.visual.transformer.prompt_tokens = nn.Parameter(prompts)


def set_finetune(clip_model: nn.Module, mode: str) -> None:
    """Set requires_grad per CLIP_FINETUNE; the text tower is always frozen.

    "attention": visual parameters whose name contains "attn" or "position";
    "full": the whole visual tower; "prompt": visual prompt tokens only; else frozen.
    """
    rules = {
        "attention": lambda n: "attn" in n or "position" in n,
        "full": lambda n: True,
        "prompt": lambda n: "prompt" in n,
    }
    rule = rules.get(mode, lambda n: False)
    for name, param in clip_model.named_parameters():
        param.requires_grad = name.startswith("visual.") and rule(name)


def resize_positional_embedding(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Resize CLIP's (1 + s*s, C) positional embedding to a (1 + h*w, C) one.

    The class position is kept; the square patch grid is resized with bicubic interpolation
    (align_corners=False). Returned unchanged when the grid already matches.
    """
    side = int(math.sqrt(pos.shape[0] - 1))
    if (side, side) == tuple(grid):
        return pos
    patch = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.flatten(2).squeeze(0).t()], dim=0)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's c_fc -> activation -> c_proj; QuickGELU / GELU run in place without autograd."""
    if not hasattr(mlp, "c_fc"):
        return mlp(x)
    act = mlp.gelu
    if type(act) is QuickGELU:
        act_ = inplace.quick_gelu_
    elif type(act) is nn.GELU and act.approximate == "none":
        act_ = torch.ops.aten.gelu_
    else:
        act_ = act
    return inplace.mlp(mlp.c_fc, mlp.c_proj, x, act, act_)


def _fusable(block: nn.Module) -> bool:
    """Whether `_block` computes exactly what this open_clip block's own forward computes."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim
            and attn.in_proj_bias is not None and attn.dropout == 0.0
            and isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity))


def _block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One open_clip ResidualAttentionBlock on (B, N, C) tokens, attention through the fused
    `scaled_dot_product_attention`; blocks of other layouts run their own forward."""
    if not _fusable(block):
        return block(x)
    attn = block.attn
    b, n, c = x.shape
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(_mlp(block.mlp, block.ln_2(x)))


def _value_only_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dense last block: attention reduced to out_proj(value projection of ln_1(x))."""
    attn = block.attn
    width = x.shape[-1]
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
    x = x + block.ls_1(attn.out_proj(v))
    return x + block.ls_2(_mlp(block.mlp, block.ln_2(x)))


def encode_image_dense(clip_model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Dense CLIP image features.

    Args:
        images: (B, 3, H, W), CLIP-normalised.
    Returns:
        (B, 1 + h*w, C): class token then the h x w patch tokens, after ln_post and proj.
    """
    visual = clip_model.visual
    x = visual.conv1(images)  # (B, width, h, w)
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + resize_positional_embedding(visual.positional_embedding, tuple(grid)).to(x.dtype)
    x = visual.ln_pre(x)

    prompts = getattr(visual.transformer, "prompt_tokens", None)
    blocks = visual.transformer.resblocks
    n_prompt = 0
    for i, block in enumerate(blocks):
        if prompts is not None and i < prompts.shape[0]:
            p = prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], p, x[:, 1 + n_prompt:]], dim=1)
            n_prompt = p.shape[1]
        x = _value_only_block(block, x) if i == len(blocks) - 1 else _block(block, x)
    if n_prompt:
        x = torch.cat([x[:, :1], x[:, 1 + n_prompt:]], dim=1)
    return visual.ln_post(x) @ visual.proj


@torch.no_grad()
def class_embeddings(
    clip_model: nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 1024,
    encode_fn=None,
) -> torch.Tensor:
    """Text embeddings of every (class, template) pair.

    A name containing ", " lists synonyms: their embeddings are L2-normalised, averaged per
    template and normalised again.
    Returns:
        (T, P, C) L2-normalised embeddings.
    """
    encode_fn = encode_fn or (lambda tokens: clip_model.encode_text(tokens))
    texts, owners = [], []
    for t, name in enumerate(class_names):
        synonyms = name.split(", ")
        texts.extend(template.format(s) for template in templates for s in synonyms)
        owners.append(len(synonyms))
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
