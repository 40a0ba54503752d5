"""Evaluation: metrics against hand-computed confusion matrices (8-bit PNG, 16-bit TIFF with
ignore 65535, ignore 459), both mIoU conventions whatever detectron2's own formula, and the
VOC-20b background evaluator."""
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from PIL import Image

from catseg.data.datasets import register_custom_dataset
from catseg.evaluation import BackgroundSemSegEvaluator, ConfusionSemSegEvaluator, build_evaluator


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
    assert type(evaluator) is ConfusionSemSegEvaluator
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


def altered_detectron2_formula(monkeypatch):
    """Make detectron2's SemSegEvaluator.evaluate report other numbers (as another build of it
    might); returns the list of its altered results."""
    original, altered = SemSegEvaluator.evaluate, []

    def evaluate(self):
        res = {k: v + 7.0 for k, v in original(self)["sem_seg"].items()}
        altered.append(res)
        return {"sem_seg": res}

    monkeypatch.setattr(SemSegEvaluator, "evaluate", evaluate)
    return altered


@pytest.mark.parametrize("detectron2_formula", ["installed", "altered"])
def test_two_miou_conventions_hand_computed(tmp_path, registered_datasets, monkeypatch, detectron2_formula):
    """a, b, c in the ground truth; d predicted but absent from it; e neither. The numbers come
    from catseg's confusion matrix, the same whatever detectron2's own evaluate reports."""
    altered = altered_detectron2_formula(monkeypatch) if detectron2_formula == "altered" else None
    classes = tmp_path / "classes.json"
    classes.write_text('["a", "b", "c", "d", "e"]')
    gt = np.array([[0, 0, 0, 0, 1], [1, 2, 2, 2, 255]], np.uint8)
    pred = np.array([[0, 0, 0, 3, 1], [1, 2, 0, 1, 3]])
    registered_datasets("eval_conventions")
    inputs = make_dataset(tmp_path, "eval_conventions", [gt], str(classes), 255)
    evaluator, res = evaluate("eval_conventions", inputs, [pred], 5)
    expected = np.zeros((6, 6), np.int64)  # rows predicted, columns ground truth (5: ignored)
    expected[0, 0], expected[3, 0] = 3, 1  # a: 4 pixels, 3 found, 1 taken for d
    expected[1, 1] = 2  # b: 2 pixels, both found
    expected[2, 2], expected[0, 2], expected[1, 2] = 1, 1, 1  # c: 3 pixels, 1 found
    expected[3, 5] = 1  # an ignored pixel predicted as d: counts nowhere
    np.testing.assert_array_equal(evaluator._conf_matrix, expected)
    # a: tp 3, gt 4, pred 4 -> IoU 3/5, ACC 3/4; b: tp 2, gt 2, pred 3 -> 2/3, 1; c: tp 1, gt 3,
    # pred 1 -> 1/3, 1/3; d: gt 0, pred 1 -> no IoU, but present in the v0.6 denominator
    iou_sum = 3 / 5 + 2 / 3 + 1 / 3
    assert res["mIoU"] == pytest.approx(100 * iou_sum / 3)  # 53.33: over a, b, c
    assert res["mIoU (v0.6 wheel)"] == pytest.approx(100 * iou_sum / 4)  # 40.00: over a, b, c, d
    assert res["fwIoU"] == pytest.approx(100 * (4 * 3 / 5 + 2 * 2 / 3 + 3 * 1 / 3) / 9)  # 52.59 = 100 * 71/135
    assert res["mACC"] == pytest.approx(100 * (3 / 4 + 1 + 1 / 3) / 3)  # 69.44 = 100 * 25/36
    assert res["pACC"] == pytest.approx(100 * 6 / 9)  # 66.67
    assert [res[f"IoU-{c}"] for c in "abc"] == pytest.approx([60.0, 200 / 3, 100 / 3])
    assert [res[f"ACC-{c}"] for c in "abc"] == pytest.approx([75.0, 100.0, 100 / 3])
    assert all(np.isnan(res[f"{m}-{c}"]) for m in ("IoU", "ACC") for c in "de")
    assert list(res)[:5] == ["mIoU", "mIoU (v0.6 wheel)", "fwIoU", "mACC", "pACC"]
    if altered:  # detectron2's evaluate ran and reported other numbers, which catseg did not use
        assert altered[0]["mIoU"] == pytest.approx(res["mIoU"] + 7.0)


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
