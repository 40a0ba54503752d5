"""Exact large-vocabulary savings: above CLASS_PAD_LENGTH (CVPR'24) a class that no view selected
is not merged in sliding-window inference; its output is written as the constant, and the result
equals merging every class (the plain path)."""
import torch
from helpers import make_model
from test_fused import close, fused_and_plain, randomize_

from catseg.modeling.aggregator import UNSELECTED_LOGIT
from catseg.modeling.meta_arch import sliding_window_views, unselected_classes

NAMES = [f"class {i}" for i in range(30)]


def test_unselected_classes_are_skipped_exactly():
    model = randomize_(make_model("cvpr24/tiny_b.yaml", ["MODEL.SEM_SEG_HEAD.CLASS_PAD_LENGTH", "4"]), std=0.02)
    model.eval().sem_seg_head.predictor.set_test_classes(NAMES)
    fused, plain = fused_and_plain(model)
    for m in (fused, plain):
        m.sliding_window = True
    image = torch.randint(0, 256, (3, 120, 150), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        views = sliding_window_views(image, fused.sliding_kernel, fused.sliding_stride, fused.sliding_out_res)
        skipped = unselected_classes(fused.logits(views))
        assert 0 < int(skipped.sum()) < len(NAMES)  # some classes skipped, some merged: the test can fail
        expected = plain([{"image": image}])[0]["sem_seg"]
        out = fused([{"image": image}])[0]["sem_seg"]
    assert out.shape == expected.shape == (len(NAMES), 120, 150)
    assert close(out, expected, 1e-6)
    constant = torch.tensor(UNSELECTED_LOGIT).sigmoid()
    assert torch.equal(out[skipped], constant.expand_as(out[skipped]))
    assert (expected[skipped] - constant).abs().max() < 1e-40  # the plain merge of a constant map


def test_unselected_classes_of_hand_made_logits():
    logits = torch.randn(3, 4, 5, 5)
    logits[:, 1] = UNSELECTED_LOGIT
    logits[:2, 3] = UNSELECTED_LOGIT  # selected by the third view only
    assert unselected_classes(logits).tolist() == [False, True, False, False]
