"""The six-benchmark command on miniature copies of the six datasets (prepared layouts, one
image each, tiny model with a 64-pixel geometry): same numbers as six separate --eval-only
runs, resumes after an interruption, skips a missing dataset (or fails with --strict); the table
shows the mIoU in both conventions."""
import json
import logging

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from helpers import CONFIGS
from PIL import Image
from train_helpers import import_train_net

from catseg.config import load_config
from catseg.data.datasets import BENCHMARKS, DatasetNotFoundError
from catseg.engine import CATSegTrainer
from catseg.engine.benchmarks import PROTOCOLS, select_protocols, write_tables

SMALL = ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE", "single",
         "MODEL.BACKBONE_RESOLUTION", "(64, 64)", "MODEL.SEM_SEG_HEAD.CLIP_RESOLUTION", "(64, 64)",
         "MODEL.SEM_SEG_HEAD.FEATURE_RESOLUTION", "[4, 4]", "MODEL.SEM_SEG_HEAD.WINDOW_SIZES", "2",
         "MODEL.SWIN.WINDOW_SIZE", "4", "TEST.SLIDING_KERNEL", "64", "TEST.SLIDING_OUT_RES", "(64, 64)",
         "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"]
LABELS = {  # dataset -> (number of classes, label dtype, ignore value)
    "ade20k_full_sem_seg_freq_val_all": (847, np.uint16, 65535), "context_459_test_sem_seg": (459, np.uint16, 459),
    "ade20k_150_test_sem_seg": (150, np.uint8, 255), "context_59_test_sem_seg": (59, np.uint8, 255),
    "voc_2012_test_sem_seg": (20, np.uint8, 255), "voc_2012_test_background_sem_seg": (21, np.uint8, 255)}


def write_miniatures(root):
    """One 40x52 image and label per benchmark, in the layout of datasets/prepare_*.py; the labels
    use the first half of the classes, so the two mIoU conventions part."""
    rng = np.random.RandomState(0)
    for k, (dataset, (classes, dtype, ignore)) in enumerate(LABELS.items()):
        bench = BENCHMARKS[dataset]
        (root / bench.image_dir).mkdir(parents=True, exist_ok=True)
        (root / bench.label_dir).mkdir(parents=True)
        stem = f"img_{k}"
        Image.fromarray(rng.randint(0, 255, (40, 52, 3), dtype=np.uint8)).save(root / bench.image_dir / f"{stem}.jpg")
        label = rng.randint(0, classes // 2, (40, 52)).astype(dtype)  # the other half: predicted at most
        label[:3] = ignore
        Image.fromarray(label).save(root / bench.label_dir / f"{stem}{bench.label_ext}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(dataset root, checkpoint of a random tiny model)."""
    tmp = tmp_path_factory.mktemp("bench")
    write_miniatures(tmp / "d2")
    torch.manual_seed(0)
    model = build_model(load_config(CONFIGS / "tiny.yaml", SMALL))
    torch.save({"model": model.state_dict()}, tmp / "tiny.pth")
    return tmp / "d2", tmp / "tiny.pth"


def run(train_net, argv):
    return train_net.main(train_net.build_parser().parse_args(argv))


def benchmark_argv(ckpt, out, *extra):
    return ["--config-file", str(CONFIGS / "tiny.yaml"), "--eval-only", "--benchmarks", "all", *extra,
            *SMALL, "MODEL.WEIGHTS", str(ckpt), "OUTPUT_DIR", str(out)]


def test_six_benchmarks_resume_skip_missing_and_equal_separate_runs(setup, tmp_path, builtin_root, monkeypatch):
    """Run 1: PC-59's labels missing, killed during the third evaluation. Run 2 (restart): the
    first two are not evaluated again, PC-59 is reported in one line, the rest are evaluated.
    Run 3 (PC-59's labels back): only PC-59 is evaluated. Every benchmark's numbers equal a
    separate --eval-only run with the official eval.sh overrides."""
    root, ckpt = setup
    builtin_root(root)
    pc59 = root / BENCHMARKS["context_59_test_sem_seg"].label_dir
    pc59.rename(pc59.with_name("hidden"))
    train_net = import_train_net()
    real_test, calls, first_run = CATSegTrainer.test, [], [True]

    def killed_during_third(cfg, model, evaluators=None):
        calls.append(cfg.DATASETS.TEST[0])
        if first_run[0] and len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_test(cfg, model, evaluators)

    monkeypatch.setattr(CATSegTrainer, "test", killed_during_third)
    out = tmp_path / "all"
    with pytest.raises(KeyboardInterrupt):
        run(train_net, benchmark_argv(ckpt, out))
    assert calls == [p.dataset for p in PROTOCOLS[:3]]
    calls.clear()
    first_run[0] = False
    records = []  # train_net's loggers do not propagate to the root logger (caplog): listen on ours
    listener = logging.Handler(logging.WARNING)
    listener.emit = records.append
    logging.getLogger("catseg.engine.benchmarks").addHandler(listener)
    try:
        results = run(train_net, benchmark_argv(ckpt, out))
    finally:
        logging.getLogger("catseg.engine.benchmarks").removeHandler(listener)
    assert calls == ["ade20k_150_test_sem_seg", "voc_2012_test_sem_seg", "voc_2012_test_background_sem_seg"]
    lines = [r.getMessage() for r in records]
    assert len(lines) == 1 and lines[0].startswith("PC-59: not evaluated, ") and "prepare_pc59.py" in lines[0]
    assert "\n" not in lines[0]
    assert [name for name, r in results.items() if r is None] == ["PC-59"] and len(results) == 6
    table = json.loads((out / "benchmarks" / "table.json").read_text())
    assert table["not_evaluated"] == ["PC-59"] and table["rows"][0]["PC-59"] is None
    assert "| - |" in (out / "benchmarks" / "table.md").read_text()

    pc59.with_name("hidden").rename(pc59)
    calls.clear()
    run(train_net, benchmark_argv(ckpt, out))
    assert calls == ["context_59_test_sem_seg"]
    monkeypatch.undo()

    table = json.loads((out / "benchmarks" / "table.json").read_text())
    assert table["benchmarks"] == ["A-847", "PC-459", "A-150", "PC-59", "PAS-20", "PAS-20b"]
    assert table["not_evaluated"] == [] and [r["result"] for r in table["rows"]] == ["sem_seg"]
    markdown = (out / "benchmarks" / "table.md").read_text().splitlines()
    assert markdown[0] == "| result | metric | A-847 | PC-459 | A-150 | PC-59 | PAS-20 | PAS-20b |"
    md_cells = {line.split(" | ")[1]: line.strip("| ").split(" | ")[2:] for line in markdown[2:]}
    csv_rows = (out / "benchmarks" / "table.csv").read_text().splitlines()
    assert csv_rows[0] == "result,metric,A-847,PC-459,A-150,PC-59,PAS-20,PAS-20b"
    csv_cells = {row.split(",")[1]: row.split(",")[2:] for row in csv_rows[1:]}
    assert [r.split(",")[:2] for r in csv_rows[1:]] == [["sem_seg", "mIoU"], ["sem_seg", "mIoU (v0.6 wheel)"]]
    assert list(md_cells) == ["mIoU", "mIoU (v0.6 wheel)"] and len(markdown) == 4
    for k, p in enumerate(PROTOCOLS):  # one separate --eval-only run per benchmark, official eval.sh overrides
        separate = tmp_path / p.key
        run(train_net, ["--config-file", str(CONFIGS / "tiny.yaml"), "--eval-only", *SMALL,
                        "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", f"datasets/{p.class_list}.json",
                        "DATASETS.TEST", f'("{p.dataset}",)', "TEST.SLIDING_WINDOW", "True",
                        "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]", "MODEL.WEIGHTS", str(ckpt),
                        "OUTPUT_DIR", str(separate)])
        expected = json.loads((separate / "metrics_eval.json").read_text())
        assert json.loads((out / "benchmarks" / p.dataset / "metrics.json").read_text()) == expected
        row = table["rows"][0][p.name]
        assert row == {m: expected["sem_seg"][m] for m in ("mIoU", "mIoU (v0.6 wheel)", "fwIoU", "pACC")}
        for metric in ("mIoU", "mIoU (v0.6 wheel)"):
            assert md_cells[metric][k] == f"{row[metric]:.1f}" and csv_cells[metric][k] == f"{row[metric]:.2f}"
        assert row["mIoU (v0.6 wheel)"] <= row["mIoU"]  # same IoU sum, a denominator at least as large
    rows = table["rows"][0]
    assert len({rows[p.name]["mIoU"] for p in PROTOCOLS}) > 1  # distinct datasets, distinct numbers
    assert any(rows[p.name]["mIoU (v0.6 wheel)"] < rows[p.name]["mIoU"] for p in PROTOCOLS)  # classes predicted, absent


def test_strict_makes_a_missing_dataset_fatal_before_anything_runs(setup, tmp_path, builtin_root):
    root, ckpt = setup
    builtin_root(tmp_path / "empty")
    train_net = import_train_net()
    args = train_net.build_parser().parse_args(benchmark_argv(ckpt, tmp_path / "strict", "--strict"))
    with pytest.raises(DatasetNotFoundError, match="ADE20K_2021_17_01"):
        train_net.prepare_config(args)


def test_benchmark_selection():
    assert [p.name for p in select_protocols("pas20b, a150")] == ["A-150", "PAS-20b"]  # paper order
    assert select_protocols("ALL") == list(PROTOCOLS)
    with pytest.raises(ValueError, match="expected 'all' or some of a847"):
        select_protocols("coco")


def test_table_has_tta_rows_when_tta_ran(tmp_path):
    metrics = {"mIoU": 50.0, "mIoU (v0.6 wheel)": 40.0, "fwIoU": 60.0, "pACC": 70.0, "mACC": 1.0}
    results = {p.name: {"sem_seg": metrics, "sem_seg_TTA": {**metrics, "mIoU": 51.25}} for p in PROTOCOLS[:2]}
    write_tables(str(tmp_path), PROTOCOLS, results)
    markdown = (tmp_path / "table.md").read_text().splitlines()
    assert markdown[2:] == ["| sem_seg | mIoU | 50.0 | 50.0 | - | - | - | - |",
                            "| sem_seg | mIoU (v0.6 wheel) | 40.0 | 40.0 | - | - | - | - |",
                            "| sem_seg_TTA | mIoU | 51.2 | 51.2 | - | - | - | - |",
                            "| sem_seg_TTA | mIoU (v0.6 wheel) | 40.0 | 40.0 | - | - | - | - |"]
    assert (tmp_path / "table.csv").read_text().splitlines()[3] == "sem_seg_TTA,mIoU,51.25,51.25,,,,"
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["rows"][1]["A-847"] == {"mIoU": 51.25, "mIoU (v0.6 wheel)": 40.0, "fwIoU": 60.0, "pACC": 70.0}
    assert table["not_evaluated"] == ["A-150", "PC-59", "PAS-20", "PAS-20b"]


def test_metrics_written_before_the_v06_column_resume_with_a_dash(tmp_path):
    results = {"A-847": {"sem_seg": {"mIoU": 12.5, "fwIoU": 60.0, "pACC": 70.0}}}
    write_tables(str(tmp_path), PROTOCOLS[:1], results)
    assert (tmp_path / "table.md").read_text().splitlines()[2:] == ["| sem_seg | mIoU | 12.5 |",
                                                                   "| sem_seg | mIoU (v0.6 wheel) | - |"]
