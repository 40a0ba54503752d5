"""Parity with the official CAT-Seg CVPR'24 implementation on the shared fixtures.

Each fixture holds the official model's state_dict (seeded-random weights, tiny CLIP), an image
and what the official code computed from it. We load the state_dict strictly into our model
built from configs/cvpr24/tiny_{b,l}.yaml and compare (tolerances: ../shared/reference/README.md).
The 260-class fixture exercises the top-256 class selection.
"""
import pytest
import torch
from helpers import make_model

# The same checks as for v1, collected here with this module's fixture_and_model.
from test_parity import run, test_sliding_window, test_text_features, test_whole_image  # noqa: F401

FIXTURES = {"catseg_cvpr24_tiny_b_s0.pt": "cvpr24/tiny_b.yaml", "catseg_cvpr24_tiny_l_s1_260.pt": "cvpr24/tiny_l.yaml"}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def fixture_and_model(request, shared):
    ref = torch.load(shared / "reference" / "parity" / request.param, weights_only=False)
    model = make_model(FIXTURES[request.param]).eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    model.sem_seg_head.predictor.set_test_classes(ref["class_names"])
    assert model.sem_seg_head.predictor.prompt_templates == ref["prompt_templates"]
    return ref, model


def test_intermediates(fixture_and_model):
    ref, model = fixture_and_model
    captured = {}

    def hook(module, inputs, output):
        img_feats, guidance = inputs
        captured.update(aggregator_in_clip=img_feats, logits=output, guidance_res3=guidance[0],
                        guidance_res4=guidance[1], guidance_res5=guidance[2])
    handle = model.sem_seg_head.predictor.register_forward_hook(hook)
    try:
        run(model, ref["image"])
    finally:
        handle.remove()
    for name, expected in ref["intermediate"].items():
        if name == "selected_classes":
            continue
        assert captured[name].shape == expected.shape, name
        assert (captured[name] - expected).abs().max().item() <= 1e-4, name
    if "selected_classes" in ref["intermediate"]:
        kept = (captured["logits"][0] != -100.0).flatten(1).any(1).nonzero().flatten()
        assert torch.equal(kept, ref["intermediate"]["selected_classes"][0])
        dropped = (captured["logits"][0] == -100.0).flatten(1).all(1)
        assert dropped.sum().item() == len(ref["class_names"]) - 256


def test_unselected_classes_are_sigmoid_minus_100(fixture_and_model):
    """260 classes: the 4 outside the top 256 come out as exactly sigmoid(-100); 7 classes
    (padded to 256): every class is computed."""
    ref, model = fixture_and_model
    model.sliding_window = False
    probs = run(model, ref["image"])
    floor = torch.sigmoid(torch.tensor(-100.0))
    if len(ref["class_names"]) <= 256:
        assert not torch.any((probs == floor).flatten(1).all(1))
        return
    selected = set(ref["intermediate"]["selected_classes"][0].tolist())
    dropped = [c for c in range(len(ref["class_names"])) if c not in selected]
    assert len(dropped) == len(ref["class_names"]) - 256
    assert torch.all(probs[dropped] == floor)
