"""Test-time augmentation (TEST.AUG): flip-only equals the mean of the plain and the flipped-back
outputs; multi-scale copies at the configured sizes; --eval-only reports *_TTA metrics beside
the plain ones."""
import json

import numpy as np
import torch
from helpers import CONFIGS
from PIL import Image
from test_benchmarks import SMALL
from train_helpers import import_train_net

from catseg.app.predictor import OpenVocabPredictor
from catseg.config import load_config
from catseg.modeling.tta import CATSegWithTTA

# SMALL: the tiny model at a 64-pixel geometry, one prompt template (speed only)
TTA = SMALL + ["TEST.AUG.ENABLED", "True", "TEST.AUG.MAX_SIZE", "4000", "TEST.AUG.FLIP", "True"]


def test_flip_only_tta_is_the_mean_of_plain_and_flipped_back():
    """Through the predictor; MIN_SIZES = the image's short side, so the only augmentation is the flip."""
    torch.manual_seed(0)
    predictor = OpenVocabPredictor(str(CONFIGS / "tiny.yaml"), weights="", opts=TTA + ["TEST.AUG.MIN_SIZES", "(48,)"])
    rgb = np.random.RandomState(0).randint(0, 255, (48, 64, 3), dtype=np.uint8)
    tta = predictor.predict(rgb).probs
    image = torch.from_numpy(rgb).permute(2, 0, 1).float()
    with torch.no_grad():
        plain = predictor.model([{"image": image, "height": 48, "width": 64}])[0]["sem_seg"]
        flipped = predictor.model([{"image": image.flip(-1), "height": 48, "width": 64}])[0]["sem_seg"].flip(-1)
    assert (plain - flipped).abs().max() > 1e-3  # the flip changes the output: the test can fail
    torch.testing.assert_close(tta, (plain + flipped) / 2, atol=1e-5, rtol=0)


def test_multi_scale_copies():
    cfg = load_config(CONFIGS / "tiny.yaml", TTA + ["TEST.AUG.MIN_SIZES", "(32, 96)"])
    wrapper = CATSegWithTTA(cfg, torch.nn.Identity())
    copies = wrapper.augmented_inputs({"image": torch.zeros(3, 48, 64, dtype=torch.uint8), "height": 48, "width": 64})
    assert [tuple(c["image"].shape[-2:]) for c in copies] == [(32, 43), (32, 43), (96, 128), (96, 128)]
    assert [c["height"] for c in copies] == [48] * 4  # every copy is predicted at the original size


def test_eval_reports_tta_metrics_beside_plain(tmp_path, registered_datasets):
    registered_datasets("tta_mini")
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "img").mkdir(parents=True)
    (data / "lbl").mkdir()
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 255, (40, 52, 3), dtype=np.uint8)).save(data / "img" / "a.png")
    Image.fromarray(rng.randint(0, 3, (40, 52)).astype(np.uint8)).save(data / "lbl" / "a.png")
    (data / "classes.json").write_text(json.dumps(["cat", "dog", "bird"]))
    train_net = import_train_net()
    args = train_net.build_parser().parse_args([
        "--config-file", str(CONFIGS / "tiny.yaml"), "--eval-only", *TTA, "TEST.AUG.MIN_SIZES", "(32, 48)",
        "DATASETS.CUSTOM", str([f"tta_mini:{data}/img:{data}/lbl:{data}/classes.json"]),
        "DATASETS.TEST", "('tta_mini',)", "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", f"{data}/classes.json",
        "INPUT.MIN_SIZE_TEST", "40", "OUTPUT_DIR", str(out)])
    train_net.main(args)
    metrics = json.loads((out / "metrics_eval.json").read_text())
    assert set(metrics) == {"sem_seg", "sem_seg_TTA"}
    assert set(metrics["sem_seg_TTA"]) == set(metrics["sem_seg"]) and "mIoU" in metrics["sem_seg_TTA"]
    assert (out / "inference_TTA" / "tta_mini").is_dir()
