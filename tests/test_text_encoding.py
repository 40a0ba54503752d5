"""EOT-bounded, length-sorted text encoding equals CLIP's full 77-token encoding."""
import open_clip
import pytest
import torch

from catseg.modeling import clip, text
from catseg.modeling.clip_encoder import DenseCLIPEncoder
from catseg.modeling.text import (
    class_text_embeddings,
    encode_texts,
    supports_eot_bounding,
    truncated_names,
    warn_truncated,
)

NAMES = [
    "", "a", "cat", "sky, heaven", "traffic light", "café au lait", "日本の寺, お寺",
    "a very long and oddly specific description of a small object on a wooden kitchen table",
    " ".join(["word"] * 90),  # over 77 tokens: truncated by the tokenizer (EOT at position 76)
]


@pytest.fixture(scope="module")
def tiny_clip():
    """catseg's CLIP module (DenseCLIPEncoder); `full_77` is open_clip's own encode_text on it."""
    model, tokenizer = clip.build_clip("ViT-B/16", "catseg-tiny-clip", "random", seed=3)
    return DenseCLIPEncoder(model).eval(), tokenizer


def full_77(model, tokens):
    return open_clip.CLIP.encode_text(model, tokens)


def texts(templates=("a photo of a {}.", "{}", "itap of a {}.")):
    return [t.format(n) for n in NAMES for t in templates]


def test_bounded_equals_full_77_tokens(tiny_clip):
    model, tokenizer = tiny_clip
    tokens = tokenizer(texts())
    assert supports_eot_bounding(model)
    with torch.no_grad():
        full = full_77(model, tokens)
        bounded = encode_texts(model, tokens, batch_size=4)  # several length-sorted batches
    assert bounded.shape == full.shape
    assert (bounded - full).abs().max().item() <= 1e-6 * max(1.0, full.abs().max().item())
    assert (torch.nn.functional.normalize(bounded, dim=-1)
            - torch.nn.functional.normalize(full, dim=-1)).abs().max().item() <= 1e-6


def test_batches_are_truncated_and_sorted(tiny_clip):
    model, tokenizer = tiny_clip
    tokens = tokenizer(texts())
    lengths = []
    hook = model.transformer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            encode_texts(model, tokens, batch_size=4)
    finally:
        hook.remove()
    assert len(lengths) == -(-len(tokens) // 4)
    assert lengths == sorted(lengths, reverse=True)  # longest batch first, similar lengths together
    assert lengths[0] == 77 and lengths[-1] < 10  # only the batch holding the >77-token text runs 77


def test_class_embeddings_equal_reference(tiny_clip):
    model, tokenizer = tiny_clip
    templates = text.prompt_templates("imagenet_select")
    reference = text.class_embeddings(model, tokenizer, NAMES, templates)
    ours = class_text_embeddings(model, tokenizer, NAMES, templates, batch_size=7)
    assert ours.shape == (len(NAMES), len(templates), 64)
    assert (ours - reference).abs().max().item() <= 1e-6


def test_fallback_without_causal_mask_or_eot_pooling(tiny_clip):
    model, tokenizer = tiny_clip
    tokens = tokenizer(texts()[:6])
    with torch.no_grad():
        expected = full_77(model, tokens)
        model.text_pool_type = "last"
        assert not supports_eot_bounding(model)
        model.text_pool_type = "argmax"
        mask = model.attn_mask
        model.attn_mask = torch.zeros_like(mask)  # bidirectional text tower: padding matters
        try:
            assert not supports_eot_bounding(model)
        finally:
            model.attn_mask = mask
        assert torch.equal(encode_texts(model, tokens, eot_bounded=False), expected)


def test_truncated_names_found_and_warned(tiny_clip):
    _, tokenizer = tiny_clip
    templates = text.prompt_templates("imagenet")
    long_name = NAMES[-1]
    near_limit = " ".join(["word"] * 70)  # fits alone, not inside "a photo of the large {}."
    assert truncated_names(tokenizer, NAMES[:-1], templates) == []
    assert truncated_names(tokenizer, [long_name, "cat, " + near_limit], templates) == [long_name, "cat, " + near_limit]
    with pytest.warns(UserWarning, match=r"'word word .*\.\.\.' is longer than CLIP's 77-token context"):
        warn_truncated([long_name], 77)


def test_truncation_warning_says_how(tiny_clip, tmp_path):
    """One warning per too-long class, naming it and how it was cut: tokens dropped, where reading stops."""
    import warnings

    model, tokenizer = tiny_clip
    templates = text.prompt_templates("imagenet")
    long_name = " ".join(["word"] * 68) + " zebra giraffe"
    note = text.truncation_note(tokenizer, long_name, templates)
    assert "has 81 tokens and keeps the first 76 and an end token; 4 of the name's 70 tokens are dropped" in note
    assert note.endswith('read up to "... word word word word word word word word"')  # zebra giraffe: cut
    encoder = text.CachedTextEncoder(cache_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder(model, tokenizer, ["cat", long_name], templates)
    ours = [str(w.message) for w in caught if "context" in str(w.message)]
    assert len(ours) == 1 and "'word word word" in ours[0] and "4 of the name's 70 tokens are dropped" in ours[0]
