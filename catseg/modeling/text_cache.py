"""On-disk cache of class text embeddings, and the cached text encoder CATSegPredictor uses.

An entry is keyed by everything its (T, P, C) embeddings depend on:
- the CLIP text tower's weights (`text_tower_fingerprint`: sha256 of every text-tower tensor's
  name, shape, dtype and exact wrap-around integer row and column sums of its bit patterns;
  computed once per process and model, again when any tensor is replaced or modified in place,
  e.g. by loading a checkpoint),
- the tokenizer (class, context length, vocabulary size),
- the class names and the prompt templates, in order,
- the encoder's own settings (format version, EOT bounding, synonym merging).
The file name is the sha256 of that key; the key itself is stored in the file and compared on
load, so a stale or corrupt file is detected, reported with a warning, and recomputed.

Writes go to a temporary file in the cache folder, then `os.replace` (atomic on POSIX and
Windows): concurrent processes never see a partial file; the last writer wins, and all writers
write the same value. An unwritable cache folder gives one warning; encoding still works.

Cache folder: MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR, else $CATSEG_CACHE, else ~/.cache/catseg;
entries are under its `text_embeddings/` subfolder.
"""
import hashlib
import json
import os
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .text_encoder import class_text_embeddings, truncated_names, warn_truncated

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
        """Atomically write an entry (temporary file in the same folder, then os.replace)."""
        entry = {"key": key, "embeddings": embeddings.detach().float().cpu().contiguous(), "truncated": list(truncated)}
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".pt")
            with os.fdopen(fd, "wb") as f:
                torch.save(entry, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
            tmp = None
        except OSError as e:
            if not self._warned_unwritable:
                warnings.warn(f"cannot write the text-embedding cache under {self.directory} ({e}); "
                              "embeddings are not cached on disk", UserWarning, stacklevel=2)
                self._warned_unwritable = True
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


class CachedTextEncoder:
    """CATSegPredictor's `text_encoder` hook: (clip_model, tokenizer, names, templates) -> (T, P, C).

    Looks the embeddings up in the disk cache; on a miss encodes them (length-sorted,
    EOT-bounded) and stores them. `last_hit` tells whether the latest call was a cache hit.
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
        warn_truncated(entry["truncated"], getattr(tokenizer, "context_length", 77))
        return entry["embeddings"]
