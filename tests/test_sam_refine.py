"""SAM-refined mode with a tiny, randomly initialised SAM built from segment-anything's own classes:
labels are constant inside every (visible part of a) SAM mask and equal the argmax of the mean
probability over the mask; pixels outside every mask keep plain CAT-Seg's labels."""
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_cfg

from catseg.app.predictor import OpenVocabPredictor
from catseg.app.sam_refine import SamRefiner, refine_labels
from catseg.errors import CatsegError, ConfigError, WeightsError

REPO = Path(__file__).resolve().parents[1]

segment_anything = pytest.importorskip("segment_anything", reason="optional extra: pip install .[sam]")

VOCAB = ["sky", "grass", "house", "road"]


def tiny_sam(img_size: int = 64, dim: int = 32):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    patch = 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=patch, embed_dim=dim, depth=1, num_heads=2,
                                      out_chans=dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(img_size // patch, img_size // patch),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)),
    )
    return sam.eval()


@pytest.fixture(scope="module")
def generator():
    from segment_anything import SamAutomaticMaskGenerator

    # thresholds off: a random SAM's quality scores mean nothing; no NMS, so that masks overlap
    # (here 48 masks of 1562-3197 of the 4800 pixels) and the overlap rule is exercised
    return SamAutomaticMaskGenerator(tiny_sam(), points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                     box_nms_thresh=1.0).generate


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    torch.manual_seed(0)
    cache = tmp_path_factory.mktemp("text_cache")
    return OpenVocabPredictor(make_cfg(opts=["MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR", str(cache)]))


def image(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[: h // 2] = (90, 150, 230)
    rgb[h // 2:, : w // 2] = (60, 160, 60)
    rgb[h // 2:, w // 2:] = (120, 120, 120)
    return np.clip(rgb + rng.integers(-10, 10, rgb.shape), 0, 255).astype(np.uint8)


def test_refined_labels_follow_sam_masks(predictor, generator):
    plain = predictor.predict(image(), VOCAB)
    masks = [m["segmentation"] for m in generator(plain.image)]
    assert len(masks) > 1 and all(m.any() for m in masks)  # the tiny SAM does produce masks here
    predictor.refiner = SamRefiner(generator)
    try:
        refined = predictor.predict(image(), VOCAB)
    finally:
        predictor.refiner = None
    assert torch.equal(refined.probs, plain.probs)
    covered = np.zeros(plain.labels.shape, bool)
    painted_last_first = sorted(range(len(masks)), key=lambda i: (masks[i].sum(), -i))  # smallest (later on ties) wins
    checked = 0
    for mask in (masks[i] for i in painted_last_first):
        visible = mask & ~covered
        covered |= mask
        if visible.any():
            expected = plain.probs[:, torch.from_numpy(mask)].mean(dim=1).argmax().item()
            values = refined.labels[torch.from_numpy(visible)].unique().tolist()
            assert values == [expected]
            checked += 1
    assert checked > 1 and (~covered).any()
    outside = torch.from_numpy(~covered)
    assert torch.equal(refined.labels[outside], plain.labels[outside])


def test_refine_labels_by_hand():
    probs = torch.zeros(3, 2, 4)
    probs[0] = 0.9  # CAT-Seg: class 0 everywhere ...
    probs[2, :, 2:] = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # ... class 2 high on 3 of the 4 right pixels
    labels = probs.argmax(0)
    big = np.zeros((2, 4), bool)
    big[:, 1:] = True
    small = np.zeros((2, 4), bool)
    small[:, 3] = True
    refined = refine_labels(probs, labels, [small, big])
    # big: mean of class 0 = 0.9, class 2 = 3/6 -> 0; small (painted last): class 2 mean 0.5 < 0.9 -> 0
    assert refined.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    probs[2, :, 3] = 1.0
    assert refine_labels(probs, labels, [small, big])[:, 3].tolist() == [2, 2]
    assert refine_labels(probs, labels, [])[0, 0] == labels[0, 0]


def test_sam_mode_start_up_errors(tmp_path):
    with pytest.raises(ConfigError, match="set MODEL.SAM.WEIGHTS"):
        SamRefiner.from_config(make_cfg())
    with pytest.raises(WeightsError, match=f"SAM weights file {tmp_path / 'sam.pth'} not found"):
        SamRefiner.from_config(make_cfg(opts=["MODEL.SAM.WEIGHTS", str(tmp_path / "sam.pth")]))
    assert issubclass(ConfigError, CatsegError)


def test_sam_weights_from_a_local_file(tmp_path):
    """The registry path: a vit_b-shaped checkpoint is too big for a test, so a broken file
    checks that loading goes through MODEL.SAM.WEIGHTS (read by catseg's one reader of weight
    files, catseg/weights/files.py) and fails with one line."""
    (tmp_path / "sam.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="sam.pth is not a readable checkpoint"):
        SamRefiner.from_config(make_cfg(opts=["MODEL.SAM.WEIGHTS", str(tmp_path / "sam.pth"),
                                              "MODEL.SAM.TYPE", "vit_b"]))


def test_cli_and_page_without_sam_weights_say_so(tmp_path, capsys):
    from catseg.app import cli as demo_cli
    from catseg.app.web import WebDemo

    sample = str(REPO / "demo" / "samples" / "beach.jpg")
    with pytest.raises(SystemExit) as exit_info:
        demo_cli.main(["--input", sample, "--output", str(tmp_path), "--vocab", "sky", "--refine", "sam",
                       "--opts", "MODEL.DEVICE", "cpu"])
    assert exit_info.value.code == 2
    assert "error: the SAM mode needs SAM weights: set MODEL.SAM.WEIGHTS (or --sam-weights)" in capsys.readouterr().err
    page = WebDemo({"tiny": (str(REPO / "configs" / "tiny.yaml"), "")}, ["MODEL.DEVICE", "cpu"])
    status, overlay, *_ = page.segment(sample, "sky; sand", "", "tiny", sam=True)
    assert status.startswith("Error: the SAM mode needs SAM weights") and overlay is None
