"""OpenVocabPredictor on the tiny config: inputs, batching, sliding window, bad vocabularies."""
import numpy as np
import pytest
import torch
from helpers import make_cfg
from PIL import Image

from catseg.app.predictor import OpenVocabPredictor, Segmentation
from catseg.app.vocabulary import EmptyVocabularyError
from catseg.image_io import ImageReadError

VOCAB = ["sky", "grass, lawn", "house"]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    torch.manual_seed(0)
    cache = tmp_path_factory.mktemp("text_cache")
    return OpenVocabPredictor(make_cfg(opts=["MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR", str(cache)]), max_side=400)


def image(h=90, w=120, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def assert_same(a: Segmentation, b: Segmentation):
    assert a.classes == b.classes and a.image_size == b.image_size
    assert torch.allclose(a.probs, b.probs, atol=1e-5)
    assert torch.equal(a.labels, b.labels)


def test_result(predictor):
    r = predictor.predict(image(), VOCAB)
    assert r.classes == VOCAB and r.image_size == (90, 120)
    assert r.probs.shape == (3, 90, 120) and r.labels.shape == (90, 120) and r.labels.dtype == torch.int64
    assert 0 <= r.probs.min() and r.probs.max() <= 1
    assert torch.equal(r.labels, r.probs.argmax(0))
    assert abs(sum(r.pixel_shares()) - 1) < 1e-9
    assert sorted(r.present()) == sorted(r.labels.unique().tolist())
    assert predictor.classes == VOCAB  # the vocabulary stays current
    assert torch.equal(predictor.predict(image()).labels, r.labels)


def test_input_kinds_agree(predictor, tmp_path):
    rgb = image(seed=1)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    reference = predictor.predict(rgb, VOCAB)
    assert_same(predictor.predict(rgb[..., ::-1].copy(), format="BGR"), reference)
    from_pil, from_path = predictor.predict([Image.fromarray(rgb), str(tmp_path / "x.png")])
    assert_same(from_pil, reference)
    assert_same(from_path, reference)


@pytest.mark.parametrize("sliding", [False, True])
def test_batch_equals_one_by_one(predictor, sliding):
    predictor.model.sliding_window = sliding
    try:
        images = [image(90, 120, 2), image(64, 50, 3), image(130, 70, 4)][:2 if sliding else 3]
        predictor.batch_size = 3
        batched = predictor.predict(images, VOCAB)
        predictor.batch_size = 1
        single = [predictor.predict(im) for im in images]
    finally:
        predictor.model.sliding_window = False
        predictor.batch_size = 2
    assert len(batched) == len(images)
    for b, s, im in zip(batched, single, images):
        assert b.labels.shape == im.shape[:2]
        assert_same(b, s)


def test_one_pixel_image(predictor):
    r = predictor.predict(image(1, 1), VOCAB)
    assert r.probs.shape == (3, 1, 1) and r.present() == [r.labels.item()]


def test_large_image_is_downscaled(predictor):
    big = np.zeros((1000, 1600, 3), np.uint8)
    big[:500] = (90, 150, 230)
    r = predictor.predict(big, VOCAB)  # max_side=400 in this fixture (config default 1280)
    assert r.image_size == (1000, 1600)
    assert r.labels.shape == (250, 400) and r.probs.shape == (3, 250, 400) and r.image.shape == (250, 400, 3)


def test_empty_vocabulary(predictor):
    for empty in ([], ["", "  ", " , "]):
        with pytest.raises(EmptyVocabularyError, match="empty vocabulary: give at least one class name"):
            predictor.predict(image(), empty)
    with pytest.raises(TypeError, match="a vocabulary is a list of class names"):
        predictor.predict(image(), "sky; grass")


def test_duplicates_removed_with_warning(predictor):
    with pytest.warns(UserWarning, match=r"duplicate class names removed \(first kept\): 'sky' x3, 'tree' x2"):
        classes = predictor.set_vocabulary(["sky", "tree", " Sky ", "tree", "sky", "grass"])
    assert classes == predictor.classes == ["sky", "tree", "grass"]
    assert predictor.head.text_features().shape[0] == 3


def test_overlong_name_truncated_with_warning(predictor):
    long_name = " ".join(["very"] * 100) + " long thing"
    with pytest.warns(UserWarning, match="is longer than CLIP's 77-token context .* truncated"):
        classes = predictor.set_vocabulary(["sky", long_name])
    assert classes == ["sky", long_name] and predictor.head.text_features().shape[0] == 2


def test_non_ascii_names(predictor):
    names = ["café, bistro", "日本の寺", "Ωmega", "straße"]
    r = predictor.predict(image(), names)
    assert r.classes == names and r.probs.shape[0] == 4 and torch.isfinite(r.probs).all()


def test_bad_image_inputs(predictor, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png: not an image"):
        predictor.predict(tmp_path / "notes.png", VOCAB)
    with pytest.raises(ImageReadError, match="expected \\(H, W\\)"):
        predictor.predict(np.zeros((4, 4, 5), np.uint8))


def test_cvpr24_model_and_text_cache(tmp_path):
    """The predictor runs the CVPR'24 model (one template, first synonym) and reuses its text
    embeddings from the disk cache in a new predictor."""
    cfg = make_cfg("cvpr24/tiny_b.yaml", ["MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR", str(tmp_path)])
    torch.manual_seed(0)  # the aggregator's random weights (CLIP's are seeded by the config)
    first = OpenVocabPredictor(cfg, max_side=400)
    r = first.predict(image(), VOCAB)
    assert r.probs.shape == (3, 90, 120)
    text = first.model.sem_seg_head.predictor.text_features(VOCAB)
    assert text.shape == (3, 1, 64)
    torch.manual_seed(0)
    second = OpenVocabPredictor(cfg, max_side=400)
    encoder = second.model.sem_seg_head.predictor.text_encoder
    assert torch.equal(second.model.sem_seg_head.predictor.text_features(VOCAB), text) and encoder.last_hit
    assert_same(second.predict(image(), VOCAB), r)
