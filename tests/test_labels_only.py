"""Labels-only inference output (TEST.OUTPUT "labels"): the argmax and top-k computed over class
chunks equal those of the whole probabilities exactly (whole image and sliding window, CVPR'24
with unselected classes, several chunks), the (T, H, W) probabilities are never allocated, and
the command lines that use it write what they wrote from the probabilities."""
import contextlib
import io

import numpy as np
import pytest
import torch
from helpers import CONFIGS, make_model
from PIL import Image
from test_benchmarks import SMALL
from test_fused import randomize_
from torch.utils._python_dispatch import TorchDispatchMode

from catseg.app import cli as demo_cli
from catseg.app.predictor import OpenVocabPredictor
from catseg.config import load_config
from catseg.modeling import meta_arch
from catseg.modeling.aggregator import UNSELECTED_LOGIT
from catseg.modeling.meta_arch import full_probabilities, sliding_window_views, unselected_classes
from catseg.modeling.top_classes import RunningTopK, top_k_over_chunks
from catseg.modeling.tta import CATSegWithTTA

KEYS = {"sem_seg_labels", "sem_seg_topk_scores", "sem_seg_topk_classes"}


def image(h, w, seed=0):
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed)).float()


def assert_exact(out: dict, probs: torch.Tensor, k: int):
    """`out` (a labels output) is exactly what the whole probabilities give."""
    assert set(out) == KEYS
    kk = min(k, len(probs))
    assert out["sem_seg_labels"].dtype == torch.int64 and out["sem_seg_topk_classes"].dtype == torch.int64
    assert out["sem_seg_topk_scores"].dtype == torch.float32
    assert out["sem_seg_topk_scores"].shape == out["sem_seg_topk_classes"].shape == (kk, *probs.shape[1:])
    assert torch.equal(out["sem_seg_labels"], probs.argmax(0))
    assert torch.equal(out["sem_seg_topk_scores"], probs.topk(kk, dim=0).values)
    assert torch.equal(out["sem_seg_topk_classes"], probs.sort(dim=0, descending=True, stable=True).indices[:kk])


@contextlib.contextmanager
def recorded_merges(monkeypatch, merge_chunk=None):
    """Yields (post-processed chunk sizes, running top-k merge sizes) of the model's inference;
    with `merge_chunk`, the running top-k merges that many classes at a time."""
    posts, merges = [], []
    post, add, over_chunks = meta_arch.sem_seg_postprocess, RunningTopK.add, meta_arch.top_k_over_chunks
    monkeypatch.setattr(meta_arch, "sem_seg_postprocess", lambda r, *a: posts.append(len(r)) or post(r, *a))
    monkeypatch.setattr(RunningTopK, "add", lambda self, scores, ids: merges.append(len(ids)) or add(self, scores, ids))
    if merge_chunk:
        monkeypatch.setattr(meta_arch, "top_k_over_chunks",
                            lambda *a, **kw: over_chunks(*a, **{**kw, "merge_chunk": merge_chunk}))
    yield posts, merges
    monkeypatch.undo()


def test_running_top_k_with_ties_and_constant_classes():
    """Scores from 4 values (many ties), a share of the classes given as a constant: every chunk
    size and k agree with argmax / topk / a stable sort of the whole tensor."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        total = int(torch.randint(1, 25, (1,), generator=gen))
        probs = torch.randint(0, 4, (total, 5, 7), generator=gen).float() / 4
        constant = torch.rand(total, generator=gen) < 0.4
        constant[0] = constant[0] and not constant.all()
        probs[constant] = 0.25  # ties the computed classes' 0.25 too
        kept, skipped = (~constant).nonzero()[:, 0], constant.nonzero()[:, 0]
        for k in (1, 2, 3, 6):
            chunk, merge_chunk = torch.randint(1, 8, (2,), generator=gen).tolist()
            top = top_k_over_chunks(lambda s: probs[kept[s]], kept, chunk, k, (5, 7), 0.25, skipped, merge_chunk)
            assert_exact(top.output(), probs, k)


def test_running_top_k_refuses_chunks_out_of_order():
    top = RunningTopK(2)
    top.add(torch.rand(2, 3, 3), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="ascending"):
        top.add(torch.rand(1, 3, 3), torch.tensor([2]))


@pytest.mark.parametrize("sliding", [False, True], ids=["whole_image", "sliding_window"])
def test_labels_equal_argmax_and_topk_of_probs(sliding, monkeypatch):
    """Two images of different sizes in one batch; the running top-k merges 3 of the 20 classes at a time."""
    model = make_model().eval()
    model.sliding_window = sliding
    inputs = [{"image": image(120, 150)}, {"image": image(70, 90, seed=1), "height": 100, "width": 80}]
    expected = [out["sem_seg"] for out in model(inputs)]
    assert model.output == "probs" and len(expected[0]) == 20
    with recorded_merges(monkeypatch, merge_chunk=3) as (_, merges):
        outputs = model(inputs, output="labels")
    if not sliding:
        assert merges == ([3] * 6 + [2]) * 2
    for out, probs in zip(outputs, expected):
        assert_exact(out, probs, 3)
    model.output, model.topk = "labels", 20  # the attribute (TEST.OUTPUT, TEST.TOPK); k = T: the whole sort
    for out, probs in zip(model(inputs), expected):
        assert_exact(out, probs, 20)


def test_memory_budget_sizes_the_chunks(monkeypatch):
    """Sliding window: the merges run over the budget's chunks (CPU_CHUNK_MB 96: 9 of the 20
    classes, about 10 MB each), the same in both outputs; whole image at 1200 x 1600: the
    post-processing and the running top-k over chunks of 13 classes (7.7 MB a class)."""
    model = make_model().eval()
    model.sliding_window = True
    inputs = [{"image": image(120, 150)}]
    with recorded_merges(monkeypatch) as (posts, _):
        probs = model(inputs)[0]["sem_seg"]
    assert posts == [9, 9, 2]
    with recorded_merges(monkeypatch) as (label_posts, merges):
        out = model(inputs, output="labels", topk=2)[0]
    assert label_posts == posts and sum(merges) == 20 and len(merges) > 1
    assert_exact(out, probs, 2)
    model.sliding_window = False
    inputs = [{"image": image(120, 150), "height": 1200, "width": 1600}]
    probs = model(inputs)[0]["sem_seg"]
    with recorded_merges(monkeypatch) as (posts, merges):
        out = model(inputs, output="labels")[0]
    assert posts == merges == [13, 7]
    assert_exact(out, probs, 3)


@pytest.mark.parametrize("topk", [3, 30])
def test_cvpr24_unselected_classes(topk, monkeypatch):
    """CVPR'24 above CLASS_PAD_LENGTH: the classes no view selected are never merged; the lowest
    ones enter the top-k as constants at their place in the id order (k = 30: all of them)."""
    model = randomize_(make_model("cvpr24/tiny_b.yaml", ["MODEL.SEM_SEG_HEAD.CLASS_PAD_LENGTH", "4"]), std=0.02)
    model.eval().sem_seg_head.predictor.set_test_classes([f"class {i}" for i in range(30)])
    model.sliding_window = True
    img = image(120, 150)
    with torch.no_grad():
        views = sliding_window_views(img, model.sliding_kernel, model.sliding_stride, model.sliding_out_res)
        skipped = unselected_classes(model.logits(views))
    kept = (~skipped).nonzero()[:, 0]
    assert 0 < len(kept) < 30
    assert any(kept.min() < u < kept.max() for u in skipped.nonzero()[:, 0])  # a constant inside the kept range
    probs = model([{"image": img}])[0]["sem_seg"]
    assert torch.equal(probs[skipped], torch.tensor(UNSELECTED_LOGIT).sigmoid().expand_as(probs[skipped]))
    for merge_chunk in (1, 4, 30):
        with recorded_merges(monkeypatch, merge_chunk) as (posts, merges):
            out = model([{"image": img}], output="labels", topk=topk)[0]
        assert sum(posts) == len(kept)  # only the selected classes are merged
        assert sum(merges) == len(kept) + min(topk, int(skipped.sum())) and max(merges) <= merge_chunk
        assert_exact(out, probs, topk)


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (bytes) any operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("sliding", [False, True], ids=["whole_image", "sliding_window"])
def test_full_probabilities_never_allocated(sliding):
    """1000 classes on a 160 x 240 output: the probabilities would take 154 MB; labels-only, no
    tensor reaches a tenth of that (the probabilities output does allocate them: the hook sees it)."""
    classes, (h, w) = 1000, (160, 240)
    opts = SMALL + ["MODEL.SEM_SEG_HEAD.CPU_CHUNK_MB", "8", "MODEL.SEM_SEG_HEAD.TEXT_CACHE", "False"]
    model = make_model(opts=opts).eval()
    model.sliding_window = sliding
    model.sem_seg_head.predictor.set_test_classes([f"class number {i}" for i in range(classes)])
    inputs = [{"image": image(h, w)}]
    full = classes * h * w * 4
    with LargestTensor() as labels_mode:
        out = model(inputs, output="labels")[0]
    assert out["sem_seg_labels"].shape == (h, w)
    assert labels_mode.largest < full / 10, (labels_mode.largest, full)
    with LargestTensor() as probs_mode:
        probs = model(inputs)[0]["sem_seg"]
    assert probs_mode.largest >= full
    assert_exact(out, probs, 3)


def test_evaluation_and_tta_use_the_probabilities():
    """TEST.OUTPUT labels: forward gives labels, but not inside `full_probabilities` (the
    trainer's test); test-time augmentation averages probabilities, then takes their top-k."""
    model = make_model(opts=SMALL + ["TEST.OUTPUT", "labels", "TEST.TOPK", "2"]).eval()
    inputs = [{"image": image(48, 64)}]
    assert set(model(inputs)[0]) == KEYS
    tta = CATSegWithTTA(load_config(CONFIGS / "tiny.yaml", SMALL + ["TEST.AUG.FLIP", "True",
                                                                     "TEST.AUG.MIN_SIZES", "(48,)"]), model)
    with full_probabilities(tta):
        probs = model(inputs)[0]["sem_seg"]
        tta_probs = tta(inputs)[0]["sem_seg"]
    assert model.output == "labels"
    assert torch.equal(model(inputs)[0]["sem_seg_labels"], probs.argmax(0))
    assert_exact(tta(inputs)[0], tta_probs, 2)


def test_predictor_and_cli_labels_match_the_probabilities(tmp_path):
    """catseg-demo (labels-only) writes the label PNG that the argmax of the probabilities gives;
    a labels-only predictor's result has no probabilities and the same labels and top-k."""
    sample = CONFIGS.parent / "demo" / "samples" / "beach.jpg"
    vocab = ["sky", "sea, ocean", "sand", "person"]
    opts = ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR", str(tmp_path / "cache")]
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = demo_cli.main(["--input", str(sample), "--output", str(tmp_path / "out"), "--vocab", "; ".join(vocab),
                              "--opts", *opts])
    assert code == 0
    written = np.asarray(Image.open(tmp_path / "out" / "beach_labels.png"))
    torch.manual_seed(0)  # the same random weights as the CLI's
    predictor = OpenVocabPredictor(str(CONFIGS / "tiny.yaml"), opts=opts)
    assert predictor.output == "probs"
    full = predictor.predict(str(sample), vocab)
    assert np.array_equal(written, full.probs.argmax(0).numpy().astype(np.uint8))
    predictor.output = "labels"
    result = predictor.predict(str(sample), vocab)
    assert result.probs is None and torch.equal(result.labels, full.labels)
    scores, ids = full.top_k(3)
    assert torch.equal(result.top_scores, scores) and torch.equal(result.top_classes, ids)
    assert [t.tolist() for t in result.top_k(2)] == [scores[:2].tolist(), ids[:2].tolist()]
