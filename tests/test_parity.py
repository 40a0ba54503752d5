"""Parity with the official CAT-Seg v1 implementation on the shared fixtures.

Each fixture holds the official model's full state_dict (seeded-random weights, tiny CLIP and
Swin), an image, and what the official code computed from it. We load the state_dict strictly
into our model built from configs/tiny.yaml (the fixture's opts) and compare.
"""
import pytest
import torch
from helpers import make_model

FIXTURES = ["catseg_v1_tiny_s0.pt", "catseg_v1_tiny_s1_500x375.pt"]


@pytest.fixture(scope="module", params=FIXTURES)
def fixture_and_model(request, shared):
    ref = torch.load(shared / "reference" / "parity" / request.param, weights_only=False)
    model = make_model().eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    model.sem_seg_head.predictor.set_test_classes(ref["class_names"])
    return ref, model


def assert_probabilities_match(ours, theirs):
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    top2 = theirs.topk(2, dim=0).values
    decided = (top2[0] - top2[1]) > 1e-5
    assert torch.equal(ours.argmax(0)[decided], theirs.argmax(0)[decided])


def run(model, image):
    with torch.no_grad():
        return model([{"image": image.float(), "height": image.shape[1], "width": image.shape[2]}])[0]["sem_seg"]


def test_text_features(fixture_and_model):
    ref, model = fixture_and_model
    with torch.no_grad():
        ours = model.sem_seg_head.predictor.text_features()
    assert ours.shape == ref["text_features_test"].shape
    assert (ours - ref["text_features_test"]).abs().max().item() <= 1e-5


def test_intermediates(fixture_and_model):
    ref, model = fixture_and_model
    captured = {}
    model.backbone.register_forward_hook(lambda m, i, o: captured.update({f"backbone_{k}": v for k, v in o.items()}))
    model.sem_seg_head.predictor.register_forward_hook(
        lambda m, i, o: captured.update(aggregator_in_clip=i[0], logits=o))
    run(model, ref["image"])
    for name, expected in ref["intermediate"].items():
        assert captured[name].shape == expected.shape, name
        assert (captured[name] - expected).abs().max().item() <= 1e-4, name


def test_whole_image(fixture_and_model):
    ref, model = fixture_and_model
    model.sliding_window = False
    assert_probabilities_match(run(model, ref["image"]), ref["sem_seg"])


def test_sliding_window(fixture_and_model):
    ref, model = fixture_and_model
    model.sliding_window = True
    try:
        assert_probabilities_match(run(model, ref["image"]), ref["sem_seg_sliding"])
    finally:
        model.sliding_window = False
