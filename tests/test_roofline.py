"""benchmarks/roofline.py's counting: FLOPs and bytes of single operations against hand counts, and
the per-stage attribution on the tiny model (the stages sum to the whole forward's FLOPs, as
FlopCounterMode counts them)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_model
from test_benchmarks import SMALL
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import inference  # noqa: E402  (benchmark scripts)
import roofline  # noqa: E402


def counted(fn):
    """[FLOPs, bytes, op floor s] of `fn()` at 100 GFLOP/s and 10 GB/s."""
    counter = roofline.op_counter(1e11, 1e10)
    with torch.inference_mode(), counter:
        fn()
    return counter.total.tolist()


def test_single_operations():
    x, w, b = torch.randn(8, 16), torch.randn(4, 16), torch.randn(4)
    # x, w, b read, (8, 4) written; 2 FLOPs per multiply-add; floor: the larger of the two times
    assert counted(lambda: F.linear(x, w, b)) == pytest.approx([2 * 8 * 16 * 4, 4 * (128 + 64 + 4 + 32), 9.12e-8])
    q = torch.randn(2, 3, 64, 32)
    assert counted(lambda: F.scaled_dot_product_attention(q, q, q))[0] == 2 * 2 * (2 * 3 * 64 * 64 * 32)
    assert counted(lambda: (q.transpose(1, 2), q[:, :1], q.flatten(0, 1))) == [0, 0, 0]  # views move nothing
    assert counted(lambda: b.expand(1000, 4) + 1)[1] == 4 * 4 + 4 * 4000  # a broadcast operand once
    assert counted(lambda: x.relu_())[1] == 2 * 4 * 128  # in place: read and written
    assert counted(lambda: x.copy_(x + 1))[1] == 2 * 4 * 128 + 2 * 4 * 128  # add; copy_: read x + 1, write x
    big, src = torch.zeros(100, 1000), torch.ones(3, 1000)
    index = torch.tensor([1, 5, 7])
    assert counted(lambda: big.index_copy_(0, index, src))[1] == 2 * (3 * 8 + 3 * 4000)  # not all of `big`


def test_rows_and_table():
    peaks = {"threads": 2, "fp32_gflops": 100.0, "bf16_gflops": 500.0, "bandwidth_gbs": 10.0,
             "detail": {"fp32": {2048: 100.0}, "bf16": {2048: 500.0}, "bandwidth": {"copy": 9.0, "add": 10.0}}}
    counts = dict.fromkeys(inference.STAGES, [0.0, 0.0, 0.0])
    counts["clip"] = [200e9, 1e9, 2.2]  # 2 s of FLOPs, 0.1 s of bytes
    counts["post"] = [0.0, 5e9, 0.5]
    stages = dict.fromkeys(inference.STAGES, 0.0)
    stages.update(clip=4.0, post=1.0)
    result = {"model": "B", "K": 20, "seconds": 5.0, "all_seconds": [5.0], "stages": stages, "counts": counts}
    rows = {r["stage"]: r for r in roofline.rows(result, peaks)}
    assert rows["clip"]["bound"] == "compute" and rows["clip"]["floor_s"] == pytest.approx(2.0)
    assert rows["clip"]["gflops"] == pytest.approx(50.0) and rows["clip"]["peak_pct"] == pytest.approx(50.0)
    assert rows["post"]["bound"] == "memory" and rows["post"]["floor_s"] == pytest.approx(0.5)
    assert rows["post"]["gbs"] == pytest.approx(5.0)
    assert rows["total"]["floor_s"] == pytest.approx(2.5) and rows["total"]["op_floor_s"] == pytest.approx(2.7)
    text = roofline.report([result], peaks)
    assert "| clip | 200.0 | 4.00 | 50.0 | 50 | 1.00 | 0.2 | compute | 2.00 | 2.0 | 2.20 | 1.8 |" in text
    assert "| **total** |" in text


def test_stages_sum_to_the_forward():
    """The counted stages of the tiny model's sliding-window forward add up to its FLOPs, counted
    whole; the CLIP, aggregator and decoder stages have FLOPs, the post-processing none."""
    torch.manual_seed(0)
    model = make_model(opts=SMALL + ["TEST.SLIDING_WINDOW", "True"]).eval()
    names = [f"class {i}" for i in range(5)]
    model.sem_seg_head.predictor.set_test_classes(names)
    batch = inference.cached_input(model, names, "cpu")
    model.requires_grad_(False)  # FlopCounterMode's module tracker fails on parameters under inference_mode
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=roofline.extra_formulas()) as whole:
        model(batch)
    counts = roofline.count_stages(model, batch, 1e11, 1e10)
    assert set(counts) == set(inference.STAGES)
    assert sum(c[0] for c in counts.values()) == pytest.approx(whole.get_total_flops(), rel=1e-6)
    for stage in ("clip", "guidance", "spatial", "class", "decoder", "agg_other"):
        assert counts[stage][0] > 0 and counts[stage][1] > 0, stage
    assert counts["post"][0] == 0 and counts["post"][1] > 0
