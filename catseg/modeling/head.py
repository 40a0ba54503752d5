"""CATSegHead (detectron2 SEM_SEG_HEADS_REGISTRY) and its predictor.

The predictor owns the dense CLIP encoder (`clip_model`) and the aggregator (`transformer`);
these names give the official state_dict keys `sem_seg_head.predictor.{clip_model,transformer}.*`.
"""
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..data.class_names import load_class_names
from ..weights.files import checkpoint_keys
from . import clip
from .aggregator import Aggregator
from .chunking import ChunkBudget
from .clip_encoder import DenseCLIPEncoder
from .text import CachedTextEncoder, prompt_templates, text_tower_fingerprint

CLIP_PREFIX = "sem_seg_head.predictor.clip_model."  # where CLIP's tensors are in a CAT-Seg state_dict


def clip_weights_source(cfg) -> str:
    """CLIP_WEIGHTS, except "random" for "pretrained" when MODEL.WEIGHTS is a local file holding
    CLIP's tensors (every official CAT-Seg checkpoint does): they replace the pretrained ones, so
    those are not downloaded (only the checkpoint's keys are read here)."""
    head = cfg.MODEL.SEM_SEG_HEAD
    weights = cfg.MODEL.WEIGHTS
    if head.CLIP_WEIGHTS != "pretrained" or not weights or not os.path.isfile(weights):
        return head.CLIP_WEIGHTS
    return "random" if any(k.startswith(CLIP_PREFIX) for k in checkpoint_keys(weights)) else head.CLIP_WEIGHTS


def build_clip_encoder(cfg) -> Tuple[DenseCLIPEncoder, object]:
    """The DenseCLIPEncoder of MODEL.SEM_SEG_HEAD (weights: `clip_weights_source`, release
    options, prompts, fine-tuning) and its tokenizer."""
    head = cfg.MODEL.SEM_SEG_HEAD
    model, tokenizer = clip.build_clip(head.CLIP_PRETRAINED, head.CLIP_MODEL, clip_weights_source(cfg),
                                       head.CLIP_RANDOM_SEED)
    encoder = DenseCLIPEncoder(model, dense_block=head.CLIP_DENSE_BLOCK, attn_weights=head.CLIP_ATTN_WEIGHTS)
    encoder.add_visual_prompts(head.PROMPT_DEPTH, head.PROMPT_LENGTH)
    encoder.set_finetune(head.CLIP_FINETUNE)
    return encoder, tokenizer


def derived(name: str, configured, actual):
    """`actual`, after checking that a configured value (0 / empty: not set) agrees with it."""
    if isinstance(actual, (list, tuple)):
        configured, actual = list(configured), list(actual)
    if configured in (0, None, []):
        return actual
    if configured != actual:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.{name} is {configured} but the built model has {actual} "
                         "(leave it unset to derive it)")
    return actual


class CATSegPredictor(nn.Module):
    """CLIP encoder + text embeddings + Aggregator.

    Text embeddings come from `text_encoder` (catseg/modeling/text.py): while training with a
    trainable text tower (CVPR'24), recomputed with gradients on every call; otherwise computed
    once per class list and kept here in memory (the encoder keeps them on disk), keyed also by
    the text tower's weights when they can change; loading new weights clears the cache.
    """

    def __init__(
        self,
        *,
        clip_model: DenseCLIPEncoder,
        tokenizer,
        prompt_templates: Sequence[str],
        train_class_names: Sequence[str],
        test_class_names: Sequence[str],
        aggregator: Aggregator,
        text_encoder: CachedTextEncoder,
    ):
        super().__init__()
        self.clip_model = clip_model
        self.transformer = aggregator
        self.tokenizer = tokenizer
        self.prompt_templates = list(prompt_templates)
        self.train_class_names = list(train_class_names)
        self.test_class_names = list(test_class_names)
        self.text_encoder = text_encoder
        self._text_cache: Dict[tuple, torch.Tensor] = {}
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self._text_cache.clear())

    @property
    def class_names(self) -> List[str]:
        """The class list of the current mode (training or inference)."""
        return self.train_class_names if self.training else self.test_class_names

    def set_test_classes(self, class_names: Sequence[str]) -> None:
        """Replace the inference vocabulary (a name with ", " lists synonyms)."""
        self.test_class_names = list(class_names)

    def text_features(self, class_names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """(T, P, C) L2-normalised text embeddings of `class_names` (default: current mode's)."""
        names = tuple(class_names if class_names is not None else self.class_names)
        trainable = self.clip_model.text_trainable
        if self.training and trainable and torch.is_grad_enabled():
            return self.text_encoder.with_grad(self.clip_model, self.tokenizer, names, self.prompt_templates)
        device = self.transformer.conv1.weight.device
        key = (names, text_tower_fingerprint(self.clip_model)) if trainable else names
        cached = self._text_cache.get(key)
        if cached is None or cached.device != device:
            # Cached embeddings serve later fp32 passes and the disk cache: never computed under
            # the bfloat16 autocast of SOLVER.AMP.ENABLED training.
            with torch.autocast(device.type, enabled=False):
                cached = self.text_encoder(self.clip_model, self.tokenizer, names, self.prompt_templates)
            cached = cached.to(device)
            if trainable:  # entries of older weights are stale
                self._text_cache.clear()
            self._text_cache[key] = cached
        return cached

    def forward(self, img_feats: torch.Tensor, guidance: Sequence[torch.Tensor]) -> torch.Tensor:
        """img_feats: (B, C, H, W) dense CLIP features; guidance: deepest first (see Aggregator).
        Returns (B, T, 4H, 4W) logits."""
        text = self.text_features()
        text = text.unsqueeze(0).expand(img_feats.shape[0], *text.shape)
        return self.transformer(img_feats, text, guidance)


@SEM_SEG_HEADS_REGISTRY.register()
class CATSegHead(nn.Module):
    """Text embeddings and cost aggregation over dense CLIP features and guidance maps."""

    @configurable
    def __init__(self, *, ignore_value: int, predictor: CATSegPredictor):
        super().__init__()
        self.ignore_value = ignore_value
        self.predictor = predictor

    @classmethod
    def from_config(cls, cfg, clip_encoder: DenseCLIPEncoder, tokenizer, guidance_channels: Sequence[int],
                    clip_resolution: Sequence[int], budget: ChunkBudget):
        """Aggregator sizes that the built modules determine are derived (a configured value must
        agree): FEATURE_RESOLUTION = the CLIP grid at `clip_resolution`, TEXT_GUIDANCE_DIM = the
        CLIP embedding size, APPEARANCE_GUIDANCE_DIM / DECODER_GUIDANCE_DIMS = the guidance
        source's channels (deepest first)."""
        head = cfg.MODEL.SEM_SEG_HEAD
        templates = prompt_templates(head.PROMPT_ENSEMBLE_TYPE)
        grid = derived("FEATURE_RESOLUTION", list(head.FEATURE_RESOLUTION), list(clip_encoder.grid(clip_resolution)))
        aggregator = Aggregator(
            text_guidance_dim=derived("TEXT_GUIDANCE_DIM", head.TEXT_GUIDANCE_DIM, clip_encoder.embed_dim),
            text_guidance_proj_dim=head.TEXT_GUIDANCE_PROJ_DIM,
            appearance_guidance_dim=derived("APPEARANCE_GUIDANCE_DIM", head.APPEARANCE_GUIDANCE_DIM,
                                            guidance_channels[0]),
            appearance_guidance_proj_dim=head.APPEARANCE_GUIDANCE_PROJ_DIM,
            decoder_dims=head.DECODER_DIMS,
            decoder_guidance_dims=derived("DECODER_GUIDANCE_DIMS", list(head.DECODER_GUIDANCE_DIMS),
                                          list(guidance_channels[1:3])),
            decoder_guidance_proj_dims=head.DECODER_GUIDANCE_PROJ_DIMS,
            num_layers=head.NUM_LAYERS,
            nheads=head.NUM_HEADS,
            hidden_dim=head.HIDDEN_DIMS,
            pooling_size=head.POOLING_SIZES,
            test_pooling_size=cfg.TEST.POOLING_SIZES,
            feature_resolution=grid,
            window_size=head.WINDOW_SIZES,
            attention_type=head.ATTENTION_TYPE,
            prompt_channel=len(templates),
            pad_length=head.CLASS_PAD_LENGTH,
            budget=budget,
            checkpoint=head.CHECKPOINT_ACTIVATIONS,
        )
        predictor = CATSegPredictor(
            clip_model=clip_encoder,
            tokenizer=tokenizer,
            prompt_templates=templates,
            train_class_names=load_class_names(head.TRAIN_CLASS_JSON),
            test_class_names=load_class_names(head.TEST_CLASS_JSON),
            aggregator=aggregator,
            text_encoder=CachedTextEncoder.from_config(cfg),
        )
        return {"ignore_value": head.IGNORE_VALUE, "predictor": predictor}

    @property
    def clip_encoder(self) -> DenseCLIPEncoder:
        return self.predictor.clip_model

    def forward(self, img_feats: torch.Tensor, guidance: Sequence[torch.Tensor]) -> torch.Tensor:
        """img_feats: (B, C, H, W) dense CLIP features; guidance: deepest first. Returns (B, T, 4H, 4W)."""
        return self.predictor(img_feats, guidance)
