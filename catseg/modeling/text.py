"""Class names -> text embeddings: prompt templates, synonyms, EOT-bounded encoding, disk cache.

The recipe (`class_embeddings`): every (class, template) text is encoded by CLIP's text tower
and L2-normalised; a class name containing ", " lists synonyms, whose embeddings are averaged
per template and normalised again ("average", v1) or of which only the first is used
("first", CVPR'24). Result per class list: (T, P, C).

Fast encoding (`class_text_embeddings`): CLIP's text transformer is causal and the text
feature is read at the end-of-text (EOT) position, so the padding after EOT cannot change it.
Texts are sorted by length and each batch runs only up to its longest EOT, with the positional
embedding and causal mask sliced to that length: the same features as the full 77-token pass,
at a fraction of the cost.

Disk cache (`TextEmbeddingCache`): an entry is keyed by everything its embeddings depend on:
- the CLIP text tower's weights (`text_tower_fingerprint`: sha256 of every text-tower tensor's
  name, shape, dtype and exact wrap-around integer row and column sums of its bit patterns;
  computed once per process and model, again when any tensor is replaced or modified in place,
  e.g. by loading a checkpoint),
- the tokenizer (class, context length, vocabulary size),
- the class names and the prompt templates, in order,
- the embedder's own settings (format version, EOT bounding, synonym merging).
The file name is the sha256 of that key; the key itself is stored in the file and compared on
load, so a stale or corrupt file is detected, reported with a warning, and recomputed. Writes
are atomic (catseg/atomic.py): concurrent processes never see a partial file. An unwritable
cache folder gives one warning; encoding still works. Folder: MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR,
else $CATSEG_CACHE, else ~/.cache/catseg; entries are under its `text_embeddings/` subfolder.

`TextEmbedder` ties them together with the config (TEXT_SYNONYMS, TEXT_CACHE, TEXT_CACHE_DIR,
read once); CATSegPredictor keeps only an in-memory cache in front of it.

Notation: N texts, L = context length (77), T classes, P templates, C embedding channels.
"""
import hashlib
import json
import os
import warnings
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from ..atomic import atomic_write
from ..data.class_names import synonyms as split_synonyms

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


def truncation_note(tokenizer, name: str, templates: Sequence[str]) -> str:
    """How the prompts of `name` are cut: 'its longest prompt keeps N of its M tokens; the
    name is read as far as "...last kept words"' (open_clip's SimpleTokenizer: exact counts)."""
    encode, decode = tokenizer.encode, getattr(tokenizer, "decode", None)
    context = tokenizer.context_length
    synonym = max(split_synonyms(name), key=lambda s: len(encode(s)))
    template = max(templates, key=lambda t: len(encode(t.format(synonym))))
    total = len(encode(template.format(synonym))) + 2  # SOT, EOT
    name_tokens = encode(synonym)
    kept = max(0, min(len(name_tokens), len(name_tokens) - (total - context)))
    note = (f"its longest prompt ({template!r}) has {total} tokens and keeps the first {context - 1} and an "
            f"end token; {len(name_tokens) - kept} of the name's {len(name_tokens)} tokens are dropped")
    if decode is not None:
        tail = decode(name_tokens[:kept]).strip()[-40:]
        note += f", the name is read up to \"...{tail}\""
    return note


def warn_truncated(names: Sequence[str], context_length: int, notes: Sequence[str] = ()) -> None:
    """One warning per class name whose prompts are cut at the context length; `notes` (one per
    name, from `truncation_note`) say how."""
    for name, note in zip(names, list(notes) or [""] * len(names)):
        shown = name if len(name) <= 60 else name[:57] + "..."
        warnings.warn(f"class name {shown!r} is longer than CLIP's {context_length}-token context "
                      f"(with its prompt templates): its prompts are truncated{': ' + note if note else ''}",
                      UserWarning, stacklevel=3)


def class_text_embeddings(clip_model: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                          batch_size: int = 512, eot_bounded: bool = True, synonyms: str = "average") -> torch.Tensor:
    """(T, P, C) L2-normalised class embeddings, as `class_embeddings`, encoded
    length-sorted and EOT-bounded. Differentiable: wrap in no_grad when no gradient is needed."""
    n_texts = len(templates) * sum(len(split_synonyms(name)) for name in class_names)
    # One tokenizer call for all texts, so that length sorting spans the whole vocabulary.
    return class_embeddings(clip_model, tokenizer, class_names, templates, batch_size=max(1, n_texts),
                                 encode_fn=lambda tokens: encode_texts(clip_model, tokens, batch_size, eot_bounded),
                                 synonyms=synonyms)


CACHE_FORMAT = 1  # bump when the stored layout or the embedding recipe changes

_fingerprints: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def default_cache_dir() -> Path:
    """$CATSEG_CACHE, else ~/.cache/catseg."""
    return Path(os.environ.get("CATSEG_CACHE") or Path.home() / ".cache" / "catseg").expanduser()


def text_tower_tensors(clip_model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state_dict tensors the text embeddings depend on (everything but the visual tower
    and the logit scale / bias)."""
    return {name: t for name, t in clip_model.state_dict(keep_vars=True).items()
            if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")}


# Integer views of each element size: the fingerprint sums bit patterns, exactly.
INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def wraparound_sums(bits: torch.Tensor):
    """(rows, ...) integer tensor -> (row sums, column sums) as numpy arrays, modulo 2^32
    (2^64 for int64). CPU tensors are summed by numpy: single-threaded, so no thread start-up
    per tensor (that dominates with PyTorch's thread pool on a busy machine)."""
    mat = bits.reshape(bits.shape[0], -1) if bits.dim() > 1 else bits.reshape(1, -1)
    if mat.device.type == "cpu":
        mat = mat.numpy()
        acc = np.int64 if mat.dtype == np.int64 else np.int32
        return mat.sum(axis=1, dtype=acc), mat.sum(axis=0, dtype=acc)
    acc = torch.int64 if mat.dtype == torch.int64 else torch.int32
    return mat.sum(dim=1, dtype=acc).cpu().numpy(), mat.sum(dim=0, dtype=acc).cpu().numpy()


@torch.no_grad()
def text_tower_fingerprint(clip_model: nn.Module) -> str:
    """sha256 hex digest identifying the text tower's weights (see module docstring).

    Each tensor's elements are read as integers (their bit patterns) and summed per row and
    per column with wrap-around (modulo 2^32, 2^64 for 8-byte elements): exact, so the digest
    does not depend on device or thread count, any single changed element changes it, and it
    costs two vectorised passes (ViT-B/16 text tower, 63 M parameters: ~0.1 s on 2 CPU cores).
    Memoised per model on (tensor storage, in-place version counter), so it is computed once
    until weights change.
    """
    tensors = text_tower_tensors(clip_model)
    signature = tuple((name, t.data_ptr(), t._version, str(t.device)) for name, t in tensors.items())
    memo = _fingerprints.get(clip_model)
    if memo is not None and memo[0] == signature:
        return memo[1]
    digest = hashlib.sha256()
    for name, t in tensors.items():
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.numel():
            for sums in wraparound_sums(t.detach().contiguous().view(INT_VIEWS[t.element_size()])):
                digest.update(sums.tobytes())
    _fingerprints[clip_model] = (signature, digest.hexdigest())
    return digest.hexdigest()


def tokenizer_identity(tokenizer) -> str:
    """Class, context length and vocabulary size of a tokenizer."""
    vocab = getattr(tokenizer, "vocab_size", None) or len(getattr(tokenizer, "encoder", ()))
    kind = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    return f"{kind}|{getattr(tokenizer, 'context_length', '')}|{vocab}"


def cache_key(clip_model: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
              encoder_config: Dict) -> Dict:
    """Everything the embeddings depend on, as a JSON-serialisable dict."""
    return {
        "format": CACHE_FORMAT,
        "text_tower": text_tower_fingerprint(clip_model),
        "tokenizer": tokenizer_identity(tokenizer),
        "class_names": list(class_names),
        "templates": list(templates),
        "encoder": dict(encoder_config),
    }


def key_digest(key: Dict) -> str:
    """sha256 hex digest of a cache key (its canonical JSON)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class TextEmbeddingCache:
    """A folder of `<key digest>.pt` files, each {"key", "embeddings" (T, P, C) float32, "truncated"}."""

    def __init__(self, directory):
        self.directory = Path(directory).expanduser() / "text_embeddings"
        self._warned_unwritable = False

    def path(self, key: Dict) -> Path:
        return self.directory / f"{key_digest(key)}.pt"

    def load(self, key: Dict) -> Optional[Dict]:
        """The stored entry for `key`, or None when absent; a corrupt or mismatching file gives
        a warning and None (the caller recomputes and overwrites it)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            emb = entry["embeddings"]
            if entry["key"] != key or emb.shape[:2] != (len(key["class_names"]), len(key["templates"])):
                raise ValueError("stored key or shape does not match")
            return entry
        except Exception as e:  # any unreadable file is recomputed, whatever the reason
            warnings.warn(f"text-embedding cache file {path} is corrupt or stale ({type(e).__name__}: {e}); "
                          "recomputing it", UserWarning, stacklevel=2)
            return None

    def save(self, key: Dict, embeddings: torch.Tensor, truncated: Sequence[str]) -> None:
        """Atomically write an entry (catseg/atomic.py); an unwritable folder warns once."""
        entry = {"key": key, "embeddings": embeddings.detach().float().cpu().contiguous(), "truncated": list(truncated)}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path(key), lambda f: torch.save(entry, f))
        except OSError as e:
            if not self._warned_unwritable:
                warnings.warn(f"cannot write the text-embedding cache under {self.directory} ({e}); "
                              "embeddings are not cached on disk", UserWarning, stacklevel=2)
                self._warned_unwritable = True


class CachedTextEncoder:
    """The text embedder: (clip_model, tokenizer, names, templates) -> (T, P, C) embeddings.

    Calling it looks the embeddings up in the disk cache (when enabled); on a miss encodes them
    without gradients (length-sorted, EOT-bounded) and stores them. `with_grad` encodes with
    gradients and no cache (a text tower that trains). `last_hit` tells whether the latest call
    was a cache hit. TEXT_SYNONYMS is read here only (`from_config`).
    """

    def __init__(self, cache_dir=None, enabled: bool = True, batch_size: int = 512, eot_bounded: bool = True,
                 synonyms: str = "average"):
        self.cache = TextEmbeddingCache(cache_dir or default_cache_dir()) if enabled else None
        self.batch_size = batch_size
        self.eot_bounded = eot_bounded
        self.synonyms = synonyms
        self.last_hit: Optional[bool] = None

    @classmethod
    def from_config(cls, cfg) -> "CachedTextEncoder":
        head = cfg.MODEL.SEM_SEG_HEAD
        return cls(cache_dir=head.TEXT_CACHE_DIR or None, enabled=head.TEXT_CACHE, synonyms=head.TEXT_SYNONYMS)

    @property
    def config(self) -> Dict:
        """The settings that change the embeddings (part of the cache key)."""
        synonyms = {"average": "mean of normalised, renormalised", "first": "first only"}[self.synonyms]
        return {"eot_bounded": self.eot_bounded, "synonyms": synonyms}

    def with_grad(self, clip_model: nn.Module, tokenizer, class_names: Sequence[str],
                  templates: Sequence[str]) -> torch.Tensor:
        """(T, P, C) embeddings with gradients to the text tower; never cached."""
        return class_text_embeddings(clip_model, tokenizer, class_names, templates, self.batch_size,
                                     self.eot_bounded, self.synonyms)

    def __call__(self, clip_model: nn.Module, tokenizer, class_names: Sequence[str],
                 templates: Sequence[str]) -> torch.Tensor:
        key = cache_key(clip_model, tokenizer, class_names, templates, self.config) if self.cache is not None else None
        entry = self.cache.load(key) if self.cache is not None else None
        self.last_hit = entry is not None
        if entry is None:
            with torch.no_grad():
                emb = class_text_embeddings(clip_model, tokenizer, class_names, templates,
                                            self.batch_size, self.eot_bounded, self.synonyms).float()
            entry = {"embeddings": emb, "truncated": truncated_names(tokenizer, class_names, templates)}
            if self.cache is not None:
                self.cache.save(key, emb, entry["truncated"])
        notes = [truncation_note(tokenizer, name, templates) for name in entry["truncated"]]
        warn_truncated(entry["truncated"], getattr(tokenizer, "context_length", 77), notes)
        return entry["embeddings"]
