"""Evaluation: SemSegEvaluator metrics against hand-computed confusion matrices (8-bit PNG,
16-bit TIFF with ignore 65535, ignore 459) and the VOC-20b background evaluator."""
import numpy as np
import pytest
import torch
from PIL import Image

from catseg.data.datasets import register_custom_dataset
from catseg.evaluation import BackgroundSemSegEvaluator, build_evaluator
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator


def make_dataset(tmp_path, name, gts, classes, ignore, ext=".png", evaluator_type="sem_seg"):
    """Register custom dataset `name` with one image per (H, W) label in `gts`; returns inputs."""
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    for k, gt in enumerate(gts):
        Image.fromarray(np.zeros(gt.shape + (3,), np.uint8)).save(tmp_path / "img" / f"{k}.jpg")
        Image.fromarray(gt).save(tmp_path / "lbl" / f"{k}{ext}")
    register_custom_dataset(name, tmp_path / "img", tmp_path / "lbl", classes, ignore_label=ignore,
                            evaluator_type=evaluator_type)
    return [{"file_name": str(tmp_path / "img" / f"{k}.jpg")} for k in range(len(gts))]


def scores_for(pred, num_channels, seed=0):
    """(K, H, W) random scores whose argmax over K is `pred` (H, W)."""
    rng = torch.Generator().manual_seed(seed)
    scores = torch.rand((num_channels,) + pred.shape, generator=rng) * 0.5
    scores.scatter_(0, torch.as_tensor(pred, dtype=torch.long)[None], 1.0)
    return scores


def evaluate(name, inputs, preds, num_channels):
    evaluator = build_evaluator(name, distributed=False)
    evaluator.reset()
    for k, (inp, pred) in enumerate(zip(inputs, preds)):
        evaluator.process([inp], [{"sem_seg": scores_for(pred, num_channels, k)}])
    return evaluator, evaluator.evaluate()["sem_seg"]


def test_sem_seg_metrics_hand_computed(tmp_path, registered_datasets):
    classes = tmp_path / "classes.json"
    classes.write_text('["a", "b", "c"]')
    # (gt, pred) pixels: (0,0) (0,1) (1,1) | (1,1) (2,0) (ignored,2)
    gts = [np.array([[0, 0, 1]], np.uint8), np.array([[1, 2, 255]], np.uint8)]
    preds = [np.array([[0, 1, 1]]), np.array([[1, 0, 2]])]
    registered_datasets("eval_png")
    inputs = make_dataset(tmp_path, "eval_png", gts, str(classes), 255)
    evaluator, res = evaluate("eval_png", inputs, preds, 3)
    assert type(evaluator) is SemSegEvaluator
    # confusion (rows pred, cols gt): class a: tp 1, gt 2, pred 2 -> IoU 1/3, acc 1/2
    # b: tp 2, gt 2, pred 3 -> IoU 2/3, acc 1; c: tp 0, gt 1, pred 0 -> IoU 0, acc 0
    assert res["IoU-a"] == pytest.approx(100 / 3)
    assert res["IoU-b"] == pytest.approx(200 / 3)
    assert res["IoU-c"] == pytest.approx(0.0)
    assert res["mIoU"] == pytest.approx(100 / 3)
    assert res["fwIoU"] == pytest.approx(100 * (0.4 / 3 + 0.4 * 2 / 3))
    assert res["mACC"] == pytest.approx(50.0)
    assert res["pACC"] == pytest.approx(60.0)
    expected = np.zeros((4, 4), np.int64)
    for g, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 0), (3, 2)]:  # ignored gt is row 3
        expected[p, g] += 1
    np.testing.assert_array_equal(evaluator._conf_matrix, expected)


def test_16bit_tiff_with_ignore_65535(tmp_path, registered_datasets):
    gt = np.array([[300, 300, 846], [65535, 0, 846]], np.uint16)
    pred = np.array([[300, 0, 846], [5, 0, 300]])
    registered_datasets("eval_tif")
    inputs = make_dataset(tmp_path, "eval_tif", [gt], "ade847", 65535, ext=".tif")
    _, res = evaluate("eval_tif", inputs, [pred], 847)
    # class 300: tp 1, gt 2, pred 2 -> 1/3; class 0: tp 1, gt 1, pred 2 -> 1/2;
    # class 846: tp 1, gt 2, pred 1 -> 1/2; classes absent from gt do not count
    assert res["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert res["pACC"] == pytest.approx(60.0)


def test_ignore_459(tmp_path, registered_datasets):
    gt = np.array([[458, 459], [1, 458]], np.uint16)
    pred = np.array([[458, 0], [1, 1]])
    registered_datasets("eval_459")
    inputs = make_dataset(tmp_path, "eval_459", [gt], "pc459", 459, ext=".tif")
    _, res = evaluate("eval_459", inputs, [pred], 459)
    assert res["mIoU"] == pytest.approx(50.0)  # 458: 1/2, 1: 1/2
    assert res["pACC"] == pytest.approx(200 / 3)


def test_voc20b_predictions_beyond_20_are_background(tmp_path, registered_datasets):
    voc20 = tmp_path / "voc20b_dataset.json"
    voc20.write_text('["c%d", ' % 0 + ", ".join(f'"c{i}"' for i in range(1, 20)) + ', "background"]')
    gt = np.array([[0, 20, 20, 255], [5, 20, 20, 5]], np.uint8)
    pred = np.array([[0, 25, 20, 30], [5, 3, 40, 19]])  # argmax over 59 prompts
    registered_datasets("eval_voc20b")
    inputs = make_dataset(tmp_path, "eval_voc20b", [gt], str(voc20), 255,
                          evaluator_type="sem_seg_background")
    evaluator, res = evaluate("eval_voc20b", inputs, [pred], 59)
    assert isinstance(evaluator, BackgroundSemSegEvaluator)
    # merged prediction [[0, 20, 20, -], [5, 3, 20, 19]]:
    # class 0: tp 1, gt 1, pred 1 -> 1; class 5: tp 1, gt 2, pred 1 -> 1/2;
    # background: tp 3, gt 4, pred 3 -> 3/4; classes 3 and 19 have no gt pixel
    assert res["IoU-c0"] == pytest.approx(100.0)
    assert res["IoU-c5"] == pytest.approx(50.0)
    assert res["IoU-background"] == pytest.approx(75.0)
    assert res["mIoU"] == pytest.approx(75.0)
    assert res["pACC"] == pytest.approx(500 / 7)


def test_merge_background_keeps_first_index_on_ties():
    evaluator = BackgroundSemSegEvaluator.__new__(BackgroundSemSegEvaluator)
    evaluator._background = 2
    scores = torch.tensor([[1.0, 0.0, 0.2], [0.0, 0.5, 0.2], [0.3, 0.5, 0.9], [1.0, 0.1, 0.9]])[:, None]
    merged = evaluator.merge_background(scores)  # (4, 1, 3) -> (3, 1, 3)
    assert merged.shape == (3, 1, 3)
    np.testing.assert_array_equal(merged.argmax(0), np.minimum(scores.argmax(0), 2))


def test_builtin_voc20b_uses_background_evaluator():
    assert MetadataCatalog.get("voc_2012_test_background_sem_seg").evaluator_type == "sem_seg_background"
    assert MetadataCatalog.get("voc_2012_test_sem_seg").evaluator_type == "sem_seg"
