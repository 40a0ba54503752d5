"""Two CPU processes (gloo, detectron2's launch): training runs and evaluates, and one-process
and two-process evaluation of the same weights give identical metrics."""
import json

import pytest
from train_helpers import mini_quickstart, quickstart_opts, run_train_net


def _train_net(config, args):
    proc = run_train_net(["--config-file", config, *args])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/cvpr24/quickstart.yaml"])
def test_two_process_training_and_evaluation(tmp_path, config):
    data = mini_quickstart(tmp_path / "qs", train=4, val=3)
    train_out = tmp_path / "train"
    _train_net(config, ["--num-gpus", "2", *quickstart_opts(data, train_out), "SOLVER.MAX_ITER", "2",
                "SOLVER.IMS_PER_BATCH", "2"])
    events = [json.loads(line) for line in (train_out / "metrics.json").read_text().splitlines()]
    assert any("sem_seg/mIoU" in e for e in events), "final evaluation ran during training"
    assert (train_out / "model_final.pth").is_file()

    weights = str(train_out / "model_final.pth")
    results = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        _train_net(config, ["--num-gpus", str(n), "--eval-only", *quickstart_opts(data, out), "MODEL.WEIGHTS", weights])
        results[n] = json.loads((out / "metrics_eval.json").read_text())
    assert results[1] == results[2]
    assert results[1]["sem_seg"]["mIoU"] == pytest.approx(
        next(e["sem_seg/mIoU"] for e in events if "sem_seg/mIoU" in e), abs=1e-9)
