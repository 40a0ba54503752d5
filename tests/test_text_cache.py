"""The on-disk text-embedding cache: hits, misses on every key part, corrupt files, atomic writes."""
import multiprocessing
import time
import warnings

import pytest
import torch

from catseg.data.class_names import load_class_names
from catseg.modeling import clip, text
from catseg.modeling.clip_encoder import DenseCLIPEncoder
from catseg.modeling.text import CachedTextEncoder, TextEmbeddingCache, cache_key, text_tower_fingerprint

NAMES = ["cat", "sky, heaven", "traffic light"]
TEMPLATES = text.prompt_templates("imagenet_select")


@pytest.fixture()
def tiny_clip():
    model, tokenizer = clip.build_clip("ViT-B/16", "catseg-tiny-clip", "random", seed=1)
    return DenseCLIPEncoder(model).eval(), tokenizer


def fresh_encoder(directory):
    """An encoder as a new process would have it: fingerprint memo empty."""
    text._fingerprints.clear()
    return CachedTextEncoder(cache_dir=directory)


def test_miss_then_hit(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    first = fresh_encoder(tmp_path)
    emb = first(model, tokenizer, NAMES, TEMPLATES)
    assert first.last_hit is False
    assert len(list((tmp_path / "text_embeddings").glob("*.pt"))) == 1
    second = fresh_encoder(tmp_path)
    again = second(model, tokenizer, NAMES, TEMPLATES)
    assert second.last_hit is True
    assert torch.equal(emb, again)
    assert torch.allclose(emb, text.class_embeddings(model, tokenizer, NAMES, TEMPLATES), atol=1e-6)


@pytest.mark.parametrize("change", ["templates", "class list", "class order", "text weights"])
def test_any_changed_key_part_misses(tiny_clip, tmp_path, change):
    model, tokenizer = tiny_clip
    fresh_encoder(tmp_path)(model, tokenizer, NAMES, TEMPLATES)
    names, templates = list(NAMES), list(TEMPLATES)
    if change == "templates":
        templates = templates[:-1]
    elif change == "class list":
        names = names + ["dog"]
    elif change == "class order":
        names = names[::-1]
    else:
        with torch.no_grad():
            model.token_embedding.weight[5, 0] += 1e-3  # one element, in place
    encoder = CachedTextEncoder(cache_dir=tmp_path)
    encoder(model, tokenizer, names, templates)
    assert encoder.last_hit is False


def test_visual_weights_and_logit_scale_do_not_matter(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    fresh_encoder(tmp_path)(model, tokenizer, NAMES, TEMPLATES)
    before = text_tower_fingerprint(model)
    with torch.no_grad():
        model.visual.conv1.weight.add_(1.0)
        model.logit_scale.add_(1.0)
    assert text_tower_fingerprint(model) == before
    encoder = CachedTextEncoder(cache_dir=tmp_path)
    encoder(model, tokenizer, NAMES, TEMPLATES)
    assert encoder.last_hit is True


def test_fingerprint_follows_loaded_weights(tiny_clip):
    model, _ = tiny_clip
    other = DenseCLIPEncoder(clip.build_clip("ViT-B/16", "catseg-tiny-clip", "random", seed=2)[0])
    before = text_tower_fingerprint(model)
    model.load_state_dict(other.state_dict())
    assert text_tower_fingerprint(model) == text_tower_fingerprint(other) != before


def test_corrupt_file_recovers_with_warning(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    expected = fresh_encoder(tmp_path)(model, tokenizer, NAMES, TEMPLATES)
    (path,) = (tmp_path / "text_embeddings").glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash, a full disk...
    encoder = fresh_encoder(tmp_path)
    with pytest.warns(UserWarning, match="text-embedding cache file .* is corrupt or stale .*; recomputing it"):
        emb = encoder(model, tokenizer, NAMES, TEMPLATES)
    assert encoder.last_hit is False and torch.allclose(emb, expected, atol=1e-6)
    repaired = fresh_encoder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repaired(model, tokenizer, NAMES, TEMPLATES)
    assert repaired.last_hit is True


def test_file_with_another_key_is_rejected(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    encoder = fresh_encoder(tmp_path)
    encoder(model, tokenizer, ["dog"], TEMPLATES)
    (other,) = (tmp_path / "text_embeddings").glob("*.pt")
    key = cache_key(model, tokenizer, NAMES, TEMPLATES, encoder.config)
    other.rename(encoder.cache.path(key))  # right file name, wrong content
    with pytest.warns(UserWarning, match="stored key or shape does not match"):
        encoder(model, tokenizer, NAMES, TEMPLATES)
    assert encoder.last_hit is False


def test_unwritable_cache_dir_warns_once_and_still_encodes(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    encoder = CachedTextEncoder(cache_dir=blocker)
    with pytest.warns(UserWarning, match="cannot write the text-embedding cache"):
        emb = encoder(model, tokenizer, NAMES, TEMPLATES)
    assert emb.shape == (3, len(TEMPLATES), 64)


def _writer(directory, key, seed):
    cache = TextEmbeddingCache(directory)
    for _ in range(5):
        cache.save(key, torch.full((2, 3, 4), float(seed)), [])


def test_concurrent_writers_never_expose_partial_files(tmp_path):
    key = {"format": 1, "class_names": ["a", "b"], "templates": ["x", "y", "z"]}
    cache = TextEmbeddingCache(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, key, seed)) for seed in range(4)]
    for p in procs:
        p.start()
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partial file would warn "corrupt"
        while any(p.is_alive() for p in procs):
            entry = cache.load(key)
            if entry is not None:
                seen.add(entry["embeddings"].unique().item())
    for p in procs:
        p.join()
        assert p.exitcode == 0
    final = cache.load(key)["embeddings"]
    assert final.unique().numel() == 1 and seen <= {0.0, 1.0, 2.0, 3.0}
    assert list(cache.directory.glob(".tmp-*")) == []


def test_ade847_x80_hit_under_a_second(tiny_clip, tmp_path):
    """Hit path for ADE-847 x 80 templates, as a second process sees it (fingerprint not memoised).

    The stored entry is written under the real key with placeholder values (computing the miss
    is benchmarked in benchmarks/text_encoding.py): the hit path reads the key, not the values.
    """
    model, tokenizer = tiny_clip
    names, templates = load_class_names("ade847"), text.prompt_templates("imagenet")
    encoder = fresh_encoder(tmp_path)
    key = cache_key(model, tokenizer, names, templates, encoder.config)
    encoder.cache.save(key, torch.randn(len(names), len(templates), 64), [])
    encoder = fresh_encoder(tmp_path)
    start = time.perf_counter()
    emb = encoder(model, tokenizer, names, templates)
    seconds = time.perf_counter() - start
    print(f"text stage, cache hit, ADE-847 x 80 templates (tiny CLIP): {seconds:.3f} s")
    assert encoder.last_hit is True and emb.shape == (847, 80, 64)
    assert seconds < 1.0
