"""train_net.py --eval-only end to end: miniature ADE-150 (prepared layout), a miniature custom
dataset with a constructed prediction checked against a hand-computed confusion matrix, and
the one-line error for a missing dataset folder."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import REPO, import_train_net, run_train_net

from catseg.modeling.meta_arch import CATSeg


def _cli(args, env_root):
    return run_train_net(args, DETECTRON2_DATASETS=str(env_root))


def test_missing_dataset_is_one_line(tmp_path):
    proc = _cli(["--config-file", "configs/tiny.yaml", "--eval-only", "MODEL.DEVICE", "cpu",
                 "DATASETS.TEST", "('ade20k_150_test_sem_seg',)"], tmp_path / "empty")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith("error: ") and "Traceback" not in proc.stderr
    assert str(tmp_path / "empty" / "ADEChallengeData2016" / "images" / "validation") in last
    assert "datasets/prepare_ade150.py" in last


@pytest.mark.parametrize("config,opts", [
    ("configs/tiny.yaml", ["MODEL.SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE", "single"]),
    ("configs/cvpr24/tiny_b.yaml", []),
])
def test_ade150_miniature_end_to_end(tmp_path, config, opts):
    root = tmp_path / "d2"
    images = root / "ADEChallengeData2016" / "images" / "validation"
    labels = root / "ADEChallengeData2016" / "annotations_detectron2" / "validation"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / "ADE_val_00000001.jpg")
    label = rng.randint(0, 150, (48, 64)).astype(np.uint8)
    label[:4] = 255
    Image.fromarray(label).save(labels / "ADE_val_00000001.png")
    out = tmp_path / "out"
    proc = _cli(["--config-file", config, "--eval-only", "MODEL.DEVICE", "cpu",
                 "DATASETS.TEST", "('ade20k_150_test_sem_seg',)",
                 "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", "ade150.json", *opts,
                 "TEST.SLIDING_WINDOW", "True", "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1, 1]",
                 "OUTPUT_DIR", str(out)], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics_eval.json").read_text())["sem_seg"]
    assert len([k for k in metrics if k.startswith("IoU-")]) == 150
    assert 0.0 <= metrics["mIoU"] <= 100.0
    assert 0.0 <= metrics["mIoU (v0.6 wheel)"] <= metrics["mIoU"]
    assert "copypaste: mIoU,mIoU (v0.6 wheel),fwIoU,mACC,pACC" in proc.stdout + proc.stderr  # both conventions


def _write_custom(root, gt):
    (root / "img").mkdir(parents=True)
    (root / "lbl").mkdir()
    for i, g in enumerate(gt):
        Image.fromarray(np.full(g.shape + (3,), 100, np.uint8)).save(root / "img" / f"{i}.png")
        Image.fromarray(g.astype(np.uint8)).save(root / "lbl" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps(["cat", "dog", "bird"]))


def test_custom_dataset_miou_matches_hand_computed_confusion(tmp_path, monkeypatch):
    rng = np.random.RandomState(1)
    gt = [rng.randint(0, 3, (20, 24)) for _ in range(2)]
    gt[0][0, :5] = 255  # ignored pixels
    pred = [np.where(rng.rand(*g.shape) < 0.7, np.clip(g, 0, 2), rng.randint(0, 3, g.shape)) for g in gt]
    _write_custom(tmp_path / "data", gt)
    by_file = {str(tmp_path / "data" / "img" / f"{i}.png"): p for i, p in enumerate(pred)}

    def constructed_forward(self, batched_inputs):
        outs = []
        for x in batched_inputs:
            p = torch.as_tensor(by_file[x["file_name"]])
            assert p.shape == (x["height"], x["width"])
            outs.append({"sem_seg": torch.nn.functional.one_hot(p, 3).permute(2, 0, 1).float()})
        return outs

    monkeypatch.setattr(CATSeg, "forward", constructed_forward)
    data, out = tmp_path / "data", tmp_path / "out"
    train_net = import_train_net()
    args = train_net.build_parser().parse_args([
        "--config-file", str(REPO / "configs" / "tiny.yaml"), "--eval-only", "MODEL.DEVICE", "cpu",
        "DATASETS.CUSTOM", str([f"mini:{data}/img:{data}/lbl:{data}/classes.json"]),
        "DATASETS.TEST", "('mini',)", "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", f"{data}/classes.json",
        "MODEL.SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE", "single", "OUTPUT_DIR", str(out)])
    train_net.main(args)
    metrics = json.loads((out / "metrics_eval.json").read_text())["sem_seg"]

    conf = np.zeros((3, 3), np.int64)  # rows: ground truth, columns: prediction
    for g, p in zip(gt, pred):
        for t in range(3):
            for q in range(3):
                conf[t, q] += int(((g == t) & (p == q)).sum())
    iou = [conf[c, c] / (conf[c].sum() + conf[:, c].sum() - conf[c, c]) for c in range(3)]
    for c, name in enumerate(["cat", "dog", "bird"]):
        assert metrics[f"IoU-{name}"] == pytest.approx(100 * iou[c], abs=1e-6)
    assert metrics["mIoU"] == pytest.approx(100 * np.mean(iou), abs=1e-6)
    assert metrics["mIoU (v0.6 wheel)"] == metrics["mIoU"]  # every predicted class is in the ground truth
    assert metrics["pACC"] == pytest.approx(100 * np.trace(conf) / conf.sum(), abs=1e-6)
