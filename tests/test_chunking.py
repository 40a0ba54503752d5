"""Chunked inference (classes in the spatial blocks / decoder, positions in the class attention,
classes in the sliding-window merge) gives the unchunked result, on the tiny config."""
import pytest
import torch
from helpers import make_model

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    m = make_model(opts=["MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1, 1]"]).eval()
    m.sem_seg_head.predictor.set_test_classes([f"class {i}" for i in range(7)])
    return m


@pytest.fixture(scope="module")
def image():
    return torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(0)).float()


def predict(model, image, sliding=False):
    model.sliding_window = sliding
    return model([{"image": image, "height": 60, "width": 80}])[0]["sem_seg"]


def configure(model, class_chunk, budget_mb, cpu_chunk_mb=0):
    """Set the model's one ChunkBudget (shared by the aggregator and the sliding-window merge)."""
    assert model.sem_seg_head.predictor.transformer.budget is model.budget
    model.budget.class_chunk, model.budget.memory_mb, model.budget.cpu_mb = class_chunk, budget_mb, cpu_chunk_mb


@pytest.fixture(scope="module")
def unchunked(model, image):
    configure(model, 7, 1e6)
    return predict(model, image), predict(model, image, sliding=True)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_class_chunks_match_unchunked(model, image, unchunked, chunk):
    configure(model, chunk, 1e6)
    assert (predict(model, image) - unchunked[0]).abs().max().item() <= TOL


def test_tiny_budget_chunks_everything(model, image, unchunked):
    """A budget smaller than one class: 1 class per chunk, a few positions per attention chunk,
    1 class per sliding-window merge chunk."""
    configure(model, 0, 0.5)
    agg = model.sem_seg_head.predictor.transformer
    with torch.no_grad():
        assert agg.chunk_sizes(5, 7, 24, 24) == (1, 7)
    assert (predict(model, image) - unchunked[0]).abs().max().item() <= TOL
    assert (predict(model, image, sliding=True) - unchunked[1]).abs().max().item() <= TOL


def test_budget_bounds_chunk_size(model):
    agg = model.sem_seg_head.predictor.transformer
    configure(model, 0, 64)
    with torch.no_grad():
        per_class, per_position = agg.chunk_sizes(5, 847, 24, 24)
        assert 1 < per_class < 847 and 1 < per_position < 576
        assert 5 * per_class * agg.slice_bytes(24, 24) <= 64 * 2 ** 20
    configure(model, 3, 64)
    with torch.no_grad():
        assert agg.chunk_sizes(5, 847, 24, 24)[0] == 3


def test_cpu_cap_shrinks_chunks_on_cpu_only(model, image, unchunked):
    """CPU_CHUNK_MB caps the budget on CPU (smaller chunks, same result); other devices keep it."""
    configure(model, 0, 1e6, cpu_chunk_mb=0.5)
    agg = model.sem_seg_head.predictor.transformer
    with torch.no_grad():
        assert agg.chunk_sizes(5, 7, 24, 24, torch.device("cpu")) == (1, 7)
        assert agg.chunk_sizes(5, 7, 24, 24, torch.device("meta")) == (7, 576)
    assert (predict(model, image) - unchunked[0]).abs().max().item() <= TOL
    assert (predict(model, image, sliding=True) - unchunked[1]).abs().max().item() <= TOL


def test_847_classes_default_chunking_matches_unchunked(image):
    """ADE-847-sized vocabulary (random text features, whole image): the default chunking (1 GiB
    budget, 96 MB CPU cap) gives the one-chunk result."""
    model = make_model(opts=["MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1, 1]"]).eval()
    predictor = model.sem_seg_head.predictor
    names = [f"class {i}" for i in range(847)]
    predictor.set_test_classes(names)
    width = predictor.clip_model.text_projection.shape[-1]
    text = torch.randn(847, len(predictor.prompt_templates), width, generator=torch.Generator().manual_seed(0))
    predictor._text_cache[tuple(names)] = torch.nn.functional.normalize(text, dim=-1)
    configure(model, 847, 1e6)
    unchunked = predict(model, image)
    configure(model, 0, 1024, cpu_chunk_mb=96)
    with torch.no_grad():
        per_class, per_position = predictor.transformer.chunk_sizes(1, 847, 24, 24)
    assert per_class < 847 and per_position < 576
    assert (predict(model, image) - unchunked).abs().max().item() <= TOL


def test_autograd_path_matches_inference_path(model, image):
    """With autograd on nothing is chunked or written in place: same logits as the chunked path."""
    configure(model, 2, 1e-3)
    clip_in = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    backbone_in = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        chunked = model.run_network(clip_in, backbone_in)
    plain = model.run_network(clip_in, backbone_in)
    assert plain.requires_grad
    assert (plain.detach() - chunked).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def cvpr24_model():
    """Tiny CVPR'24 model (class padding to 256, top-256 selection) with 300 random-text classes."""
    m = make_model("cvpr24/tiny_b.yaml", ["TEST.POOLING_SIZES", "[1, 1]"]).eval()
    predictor = m.sem_seg_head.predictor
    names = [f"class {i}" for i in range(300)]
    predictor.set_test_classes(names)
    width = predictor.clip_model.embed_dim
    text = torch.randn(300, 1, width, generator=torch.Generator().manual_seed(0))
    predictor._text_cache[tuple(names)] = torch.nn.functional.normalize(text, dim=-1)
    return m


@pytest.mark.parametrize("sliding", [False, True])
def test_cvpr24_over_256_classes_chunked_matches_unchunked(cvpr24_model, image, sliding):
    """More than 256 classes (selection, then 256 classes without padding): 1, 3 and all classes
    per chunk give the one-chunk result."""
    configure(cvpr24_model, 300, 1e6)
    expected = predict(cvpr24_model, image, sliding)
    floored = (expected == torch.sigmoid(torch.tensor(-100.0))).flatten(1).all(1).sum().item()
    # whole image: the 44 unselected classes; sliding window: each view selects its own 256
    assert floored == 300 - 256 if not sliding else 0 < floored < 300 - 256
    for chunk in ((1, 3) if not sliding else (3,)):  # sliding: 5 views x 256 classes, kept short
        configure(cvpr24_model, chunk, 1e6)
        assert (predict(cvpr24_model, image, sliding) - expected).abs().max().item() <= TOL


def test_cvpr24_padded_classes_chunked_matches_unchunked(image):
    """Fewer than 256 classes (padding): 1, 3 and all classes per chunk agree."""
    m = make_model("cvpr24/tiny_b.yaml", ["TEST.POOLING_SIZES", "[1, 1]"]).eval()
    m.sem_seg_head.predictor.set_test_classes([f"class {i}" for i in range(7)])
    configure(m, 7, 1e6)
    expected = predict(m, image)
    for chunk in (1, 3):
        configure(m, chunk, 0.5)
        assert (predict(m, image) - expected).abs().max().item() <= TOL
