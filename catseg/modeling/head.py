"""CATSegHead (detectron2 SEM_SEG_HEADS_REGISTRY) and its predictor.

The predictor owns the CLIP model (`clip_model`) and the aggregator (`transformer`); these
names give the official state_dict keys `sem_seg_head.predictor.{clip_model,transformer}.*`.
"""
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from einops import rearrange
from torch import nn

from ..data.class_names import load_class_names
from . import clip
from .aggregator import Aggregator
from .text_cache import CachedTextEncoder


def guidance_dims(cfg, input_shape: Dict[str, ShapeSpec]):
    """Appearance / decoder guidance channels: the config's, or derived from the backbone.

    The aggregator takes backbone features deepest first: the deepest one is the appearance
    guidance, the next two feed the decoder. APPEARANCE_GUIDANCE_DIM 0 or empty
    DECODER_GUIDANCE_DIMS mean "derive from backbone.output_shape()".
    """
    head = cfg.MODEL.SEM_SEG_HEAD
    by_depth = [s.channels for _, s in sorted(input_shape.items(), key=lambda kv: -kv[1].stride)]
    appearance = head.APPEARANCE_GUIDANCE_DIM or by_depth[0]
    decoder = list(head.DECODER_GUIDANCE_DIMS) or by_depth[1:3]
    return appearance, decoder


class CATSegPredictor(nn.Module):
    """CLIP + text embeddings + Aggregator.

    Text embeddings are computed once per (class list, template set) and cached; loading new
    weights clears the cache.
    """

    def __init__(
        self,
        *,
        clip_model: nn.Module,
        tokenizer,
        prompt_templates: Sequence[str],
        train_class_names: Sequence[str],
        test_class_names: Sequence[str],
        aggregator: Aggregator,
        text_encoder=None,
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
        device = self.transformer.conv1.weight.device
        cached = self._text_cache.get(names)
        if cached is None or cached.device != device:
            if self.text_encoder is not None:
                cached = self.text_encoder(self.clip_model, self.tokenizer, names, self.prompt_templates)
            else:
                cached = clip.class_embeddings(self.clip_model, self.tokenizer, names, self.prompt_templates)
            cached = cached.to(device)
            self._text_cache[names] = cached
        return cached

    def forward(self, img_feats: torch.Tensor, guidance: Dict[str, torch.Tensor]) -> torch.Tensor:
        """img_feats: (B, C, H, W); guidance: backbone features by name. Returns (B, T, 4H, 4W) logits."""
        vis = [guidance[k] for k in guidance][::-1]
        text = self.text_features().unsqueeze(0).expand(img_feats.shape[0], -1, -1, -1)
        return self.transformer(img_feats, text, vis)


@SEM_SEG_HEADS_REGISTRY.register()
class CATSegHead(nn.Module):
    """Reshapes dense CLIP tokens to a grid and runs the predictor."""

    @configurable
    def __init__(self, *, feature_resolution: Sequence[int], ignore_value: int, predictor: CATSegPredictor):
        super().__init__()
        self.feature_resolution = tuple(feature_resolution)
        self.ignore_value = ignore_value
        self.predictor = predictor

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        clip_model, tokenizer = clip.build_clip(head.CLIP_PRETRAINED, head.CLIP_MODEL, head.CLIP_WEIGHTS,
                                                head.CLIP_RANDOM_SEED)
        clip.add_visual_prompts(clip_model, head.PROMPT_DEPTH, head.PROMPT_LENGTH)
        clip.set_finetune(clip_model, head.CLIP_FINETUNE)
        templates = clip.prompt_templates(head.PROMPT_ENSEMBLE_TYPE)
        appearance_dim, decoder_dims = guidance_dims(cfg, input_shape)
        aggregator = Aggregator(
            text_guidance_dim=head.TEXT_GUIDANCE_DIM,
            text_guidance_proj_dim=head.TEXT_GUIDANCE_PROJ_DIM,
            appearance_guidance_dim=appearance_dim,
            appearance_guidance_proj_dim=head.APPEARANCE_GUIDANCE_PROJ_DIM,
            decoder_dims=head.DECODER_DIMS,
            decoder_guidance_dims=decoder_dims,
            decoder_guidance_proj_dims=head.DECODER_GUIDANCE_PROJ_DIMS,
            num_layers=head.NUM_LAYERS,
            nheads=head.NUM_HEADS,
            hidden_dim=head.HIDDEN_DIMS,
            pooling_size=head.POOLING_SIZES,
            test_pooling_size=cfg.TEST.POOLING_SIZES,
            feature_resolution=head.FEATURE_RESOLUTION,
            window_size=head.WINDOW_SIZES,
            attention_type=head.ATTENTION_TYPE,
            prompt_channel=len(templates),
            class_chunk_size=head.CLASS_CHUNK_SIZE,
            memory_budget_mb=head.MEMORY_BUDGET_MB,
            cpu_chunk_mb=head.CPU_CHUNK_MB,
        )
        predictor = CATSegPredictor(
            clip_model=clip_model,
            tokenizer=tokenizer,
            prompt_templates=templates,
            train_class_names=load_class_names(head.TRAIN_CLASS_JSON),
            test_class_names=load_class_names(head.TEST_CLASS_JSON),
            aggregator=aggregator,
            text_encoder=CachedTextEncoder.from_config(cfg),
        )
        return {"feature_resolution": head.FEATURE_RESOLUTION, "ignore_value": head.IGNORE_VALUE,
                "predictor": predictor}

    def forward(self, clip_tokens: torch.Tensor, guidance: Dict[str, torch.Tensor]) -> torch.Tensor:
        """clip_tokens: (B, 1 + H*W, C) dense CLIP output (class token first). Returns (B, T, 4H, 4W)."""
        h, w = self.feature_resolution
        img_feats = rearrange(clip_tokens[:, 1:], "b (h w) c -> b c h w", h=h, w=w)
        return self.predictor(img_feats, guidance)
