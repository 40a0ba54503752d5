"""EOT-bounded CLIP text encoding: encode each batch only up to its longest end-of-text token.

CLIP's text transformer is causal (every token attends only to itself and earlier tokens) and
the text feature is read at the end-of-text (EOT) position. The padding tokens after EOT can
therefore not change that feature: running the transformer on the first `max EOT + 1` tokens,
with the positional embedding and the causal mask sliced to that length, gives the same
feature as the full 77-token pass, at a fraction of the cost (class prompts are ~10-20 tokens).
Texts are sorted by length so that each batch holds texts of similar length.

Notation: N texts, L = context length (77), C embedding channels.
"""
import warnings
from typing import List, Sequence

import torch
from torch import nn

from ..data.class_names import synonyms as split_synonyms
from . import clip

# Pool types whose feature is read at (or before) the end-of-text token.
EOT_POOL_TYPES = ("argmax", "eos")


def supports_eot_bounding(clip_model: nn.Module) -> bool:
    """Whether `clip_model` is an open_clip CLIP with a causal text mask and EOT pooling."""
    mask = getattr(clip_model, "attn_mask", None)
    if mask is None or getattr(clip_model, "text_pool_type", None) not in EOT_POOL_TYPES:
        return False
    upper = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
    return bool(torch.isinf(mask[upper]).all()) and not bool(mask[~upper].any())


def eot_positions(clip_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) token ids -> (N,) index of the token the text feature is read at (the EOT)."""
    if clip_model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == clip_model.text_eos_id).int().argmax(dim=-1)


def encode_text_bounded(clip_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) tokens -> (N, C) unnormalised text features, computed on the first
    max(EOT position) + 1 tokens only (equal to the full-length `clip_model.encode_text(tokens)`;
    `clip_model` is a DenseCLIPEncoder, whose encode_text takes any length)."""
    length = int(eot_positions(clip_model, tokens).max()) + 1
    return clip_model.encode_text(tokens[:, :length])


def encode_texts(clip_model: nn.Module, tokens: torch.Tensor, batch_size: int = 512,
                 eot_bounded: bool = True) -> torch.Tensor:
    """(N, L) tokens -> (N, C) unnormalised features, in the input order.

    With `eot_bounded` (and a model that supports it) texts are sorted by EOT position, batched
    and each batch is encoded up to its own longest EOT; otherwise batches of full-length
    `clip_model.encode_text`.
    """
    if not (eot_bounded and supports_eot_bounding(clip_model)):
        return torch.cat([clip_model.encode_text(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)])
    order = eot_positions(clip_model, tokens).argsort(descending=True)
    feats = torch.cat([encode_text_bounded(clip_model, tokens[order[i:i + batch_size]])
                       for i in range(0, len(tokens), batch_size)])
    return torch.empty_like(feats).index_copy_(0, order.to(feats.device), feats)


def truncated_names(tokenizer, class_names: Sequence[str], templates: Sequence[str]) -> List[str]:
    """Class names for which some (synonym, template) text exceeds the tokenizer's context
    length (CLIP then keeps the first L - 1 tokens and an EOT).

    Exact for open_clip's SimpleTokenizer (it has `encode`); other tokenizers are not checked.
    """
    encode, context = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or not context:
        return []
    overhead = max(len(encode(t.format(""))) for t in templates) + 2  # template words, SOT, EOT
    too_long = []
    for name in class_names:
        for synonym in split_synonyms(name):
            n = len(encode(synonym))
            # BPE merges across the template boundary change counts by a few tokens at most:
            # only names near the limit get the exact per-template check.
            if n + overhead + 2 > context and any(len(encode(t.format(synonym))) + 2 > context for t in templates):
                too_long.append(name)
                break
    return too_long


def warn_truncated(names: Sequence[str], context_length: int) -> None:
    """One warning per class name whose prompts are cut at the context length."""
    for name in names:
        shown = name if len(name) <= 60 else name[:57] + "..."
        warnings.warn(f"class name {shown!r} is longer than CLIP's {context_length}-token context "
                      "(with its prompt templates): its prompts are truncated", UserWarning, stacklevel=3)


def class_text_embeddings(clip_model: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                          batch_size: int = 512, eot_bounded: bool = True, synonyms: str = "average") -> torch.Tensor:
    """(T, P, C) L2-normalised class embeddings, as `clip.class_embeddings`, encoded
    length-sorted and EOT-bounded. Differentiable: wrap in no_grad when no gradient is needed."""
    n_texts = len(templates) * sum(len(split_synonyms(name)) for name in class_names)
    # One tokenizer call for all texts, so that length sorting spans the whole vocabulary.
    return clip.class_embeddings(clip_model, tokenizer, class_names, templates, batch_size=max(1, n_texts),
                                 encode_fn=lambda tokens: encode_texts(clip_model, tokens, batch_size, eot_bounded),
                                 synonyms=synonyms)
