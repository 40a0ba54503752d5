"""Roofline table of CAT-Seg inference: per stage FLOPs, bytes moved, seconds, against this machine's peaks.

For each (model, K): the stages of benchmarks/inference.py (clip, guidance, spatial, class,
decoder, agg_other, post), their FLOPs and the bytes they move for one image, their seconds, the
achieved GFLOP/s and GB/s against the measured peaks, and a floor: the seconds the stage would
take at the fp32 GEMM peak or at the memory bandwidth, whichever is slower.

    python benchmarks/roofline.py --models B L CVPR24-B CVPR24-L --classes 150 847 \
        --json roofline.json --write roofline.md

Protocol: that of benchmarks/inference.py (its `load`, `cached_input`, `time_stages`): random
weights at the real sizes, one 512x683 image, sliding window (4 crops + 1 global view),
POOLING_SIZES [1, 1], `--threads` threads, fp32, text features in the predictor's cache; every
(model, K) in its own subprocess. The subprocess first times `--repeats` forwards (one untimed
warm-up when repeats > 1; median), then counts one more forward: the counting runs after the
timed ones, so it does not change their seconds. Stages are attributed by the same hooks
(`inference.stage_modules`, `StageTimer`), here with FLOPs and bytes as the clock.

- Peaks, measured first in the same run, in their own subprocess, `--threads` threads, best of
  `--peak-repeats`: fp32 GEMM (`torch.mm`, square, n = 2048 and 4096), bf16 GEMM (the same, a
  reference line: this CPU has AVX512-BF16 / AMX; inference runs fp32), memory bandwidth (the
  faster of a copy and an add of 256 MiB fp32 tensors, bytes read + written).
- FLOPs: the formulas of `torch.utils.flop_counter` (matrix products, convolutions, attention;
  2 FLOPs per multiply-add; the CPU fused attention kernel is given its formula here), applied
  per aten operation (composite products such as linear or einsum are decomposed first).
  Elementwise operations, softmax, normalisation and resizing count 0 FLOPs.
  Check: CLIP ViT-B/16 at 384 (577 tokens, 12 blocks) is ~109 GFLOP per view (~55 G multiply-adds,
  what fvcore calls FLOPs), 545 GFLOP for the 5 views: the "clip" row of B and CVPR24-B.
- Bytes moved: per aten operation, the bytes of its tensor inputs and outputs (distinct elements:
  an expanded or overlapping view counts its storage at most); views move nothing; an in-place
  operation reads and writes `self` (copy_, fill_, zero_ only write it); an indexed
  in-place write (index_copy_, index_put_, ...) counts its source twice (read, written). It is the
  traffic of unfused operations whose operands come from memory: too high where operands stay in
  cache between operations, too low where a kernel re-reads its operands (small GEMM tiles).
- floor s = max(FLOPs / fp32 peak, bytes / bandwidth) per stage, "bound" says which term is the
  larger; op floor s = the same maximum taken per operation and summed, a tighter floor (an
  operation cannot overlap the next in eager PyTorch). The total row sums the stages' floors.
  seconds / floor is how far a stage is from its floor: near 1, only fewer FLOPs or bytes (or
  bf16, see its peak) make it faster; far above, the time goes to overheads the counts do not
  see (small operations, Python, poor kernel shapes, cache misses beyond the estimate).
- GFLOP = 1e9 FLOPs, GB = 1e9 bytes. One timed run per configuration by default, as the K = 150
  and 847 rows of RESULTS.md; timings need an otherwise idle machine (the peaks too).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference  # noqa: E402  (sibling benchmark script)

GEMM_SIZES = (2048, 4096)
BANDWIDTH_MIB = 256
# in-place writes of a part of `self` (indices, a mask): they move their sources, not `self`
INDEXED_WRITES = {"index_copy_", "index_put_", "_index_put_impl_", "index_add_", "scatter_", "scatter_add_",
                  "scatter_reduce_", "masked_scatter_", "put_"}
WRITE_ONLY = {"copy_", "fill_", "zero_"}  # in-place operations that write `self` without reading it
# composite operations with products inside that reach a dispatch mode whole (under inference_mode)
DECOMPOSED = {"linear", "bilinear", "matmul", "einsum", "tensordot", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "scaled_dot_product_attention"}


def gemm_gflops(dtype, n: int, repeats: int) -> float:
    """Best GFLOP/s of an (n, n) @ (n, n) `torch.mm` in `dtype` over `repeats` runs (after one warm-up)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def bandwidth_gbs(mib: int, repeats: int) -> dict:
    """Best GB/s (bytes read + written) of a copy and of an add of `mib` MiB fp32 tensors."""
    import torch

    n = mib * 2**20 // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    out = {}
    for name, op, moved in (("copy", lambda: c.copy_(a), 2), ("add", lambda: torch.add(a, b, out=c), 3)):
        op()
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            op()
            best = min(best, time.perf_counter() - start)
        out[name] = moved * n * 4 / best / 1e9
    return out


def measure_peaks(threads: int, repeats: int) -> dict:
    """This machine's fp32 and bf16 GEMM peaks (GFLOP/s) and memory bandwidth (GB/s) at `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    fp32 = {n: gemm_gflops(torch.float32, n, repeats) for n in GEMM_SIZES}
    bf16 = {n: gemm_gflops(torch.bfloat16, n, repeats) for n in GEMM_SIZES}
    bandwidth = bandwidth_gbs(BANDWIDTH_MIB, repeats)
    return {"threads": threads, "fp32_gflops": max(fp32.values()), "bf16_gflops": max(bf16.values()),
            "bandwidth_gbs": max(bandwidth.values()),
            "detail": {"fp32": fp32, "bf16": bf16, "bandwidth": bandwidth}}


def tensor_bytes(t) -> int:
    """Bytes of the distinct elements `t` addresses: broadcast (stride 0) dimensions once, at most its storage."""
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0) if t.numel() else 0
    return min(distinct * t.element_size(), t.untyped_storage().nbytes())


def is_view(func) -> bool:
    """Whether aten operation `func` returns an alias of an input that it does not write (a view)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU fused attention (`_scaled_dot_product_flash_attention_for_cpu`) from its
    operands' shapes: q @ k^T and weights @ v, 2 per multiply-add; the softmax and the mask are not counted."""
    batch = math.prod(query_shape[:-2])
    return 2 * batch * query_shape[-2] * key_shape[-2] * (query_shape[-1] + value_shape[-1])


def linear_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of oneDNN's linear (`mkldnn::_linear_pointwise`, catseg/modeling/epilogue_linear.py):
    the product only, 2 per multiply-add."""
    return 2 * math.prod(input_shape[:-1]) * weight_shape[0] * weight_shape[1]


def extra_formulas() -> dict:
    """Shape formulas of the operations FlopCounterMode's `flop_registry` lacks: the CPU fused
    attention and oneDNN's linear (its `custom_mapping`)."""
    import torch

    extra = {torch.ops.mkldnn._linear_pointwise: linear_flops}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        extra[cpu_attention] = attention_flops
    return extra


def flop_formulas() -> dict:
    """operation (packet) -> FLOPs of one call (tensors, out_val=output): FlopCounterMode's
    `flop_registry` and `extra_formulas`, given the operands' shapes."""
    from torch.utils.flop_counter import flop_registry

    formulas = dict(flop_registry)
    for op, formula in extra_formulas().items():
        formulas[op] = lambda *args, out_val=None, formula=formula, **kwargs: formula(
            *[a.shape if hasattr(a, "shape") else a for a in args])
    return formulas


def op_counter(peak_flops: float, bandwidth: float):
    """A TorchDispatchMode that keeps `total`: [FLOPs, bytes moved, op floor seconds] of the aten
    operations run under it so far. The composite operations of `DECOMPOSED` run as their
    decomposition, so that their products are counted (FlopCounterMode decomposes every composite
    operation: its Python decomposition of bilinear resizing is ~10x slower than the kernel)."""
    import numpy as np
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    formulas = flop_formulas()

    def tensors(tree):
        return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.total = np.zeros(3)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func._schema.name.split("::")[-1]
            if name in DECOMPOSED:
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            out = func(*args, **kwargs)
            outputs = tensors(out)
            if not outputs or is_view(func):
                return out
            formula = formulas.get(func._overloadpacket)
            flops = formula(*args, **kwargs, out_val=out) if formula else 0
            inputs = tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
            if name in INDEXED_WRITES:
                moved = 2 * sum(map(tensor_bytes, inputs[1:]))
            elif name in WRITE_ONLY:
                moved = sum(map(tensor_bytes, inputs[1:] + outputs))
            else:
                moved = sum(map(tensor_bytes, inputs + outputs))
            self.total += (flops, moved, max(flops / peak_flops, moved / bandwidth))
            return out

    return OpCounter()


def count_stages(model, batch, peak_flops: float, bandwidth: float) -> dict:
    """Per stage [FLOPs, bytes moved, op floor seconds] of one forward of `batch` (stages as `instrument`)."""
    import numpy as np
    import torch

    counter = op_counter(peak_flops, bandwidth)
    timer = inference.StageTimer("cpu", clock=lambda: counter.total.copy())
    inference.instrument(model, timer)
    with torch.no_grad(), counter:
        model(batch)
    stages = inference.stage_seconds(timer.totals, counter.total.copy())
    return {k: (np.zeros(3) + v).tolist() for k, v in stages.items()}


def worker(args) -> dict:
    """One (model, K) in this process: its timed forwards, then the counted one."""
    model, names = inference.load(args, list(args.opts))
    batch = inference.cached_input(model, names, args.device)
    result = inference.time_stages(model, batch, args)
    start = time.perf_counter()
    result["counts"] = count_stages(model, batch, args.peak_gflops * 1e9, args.bandwidth_gbs * 1e9)
    result["count_seconds"] = time.perf_counter() - start  # the counted forward (not in the table)
    return result


def rows(result: dict, peaks: dict) -> list:
    """Table rows (dicts) of one configuration: one per stage, then the total."""
    peak, bandwidth = peaks["fp32_gflops"] * 1e9, peaks["bandwidth_gbs"] * 1e9
    out = []
    for stage in inference.STAGES:
        flops, moved, op_floor = result["counts"][stage]
        out.append({"stage": stage, "flops": flops, "bytes": moved, "seconds": result["stages"][stage],
                    "compute_s": flops / peak, "memory_s": moved / bandwidth, "op_floor_s": op_floor})
    total = {key: sum(r[key] for r in out) for key in ("flops", "bytes", "seconds", "compute_s", "memory_s",
                                                       "op_floor_s")}
    total["floor_s"] = sum(max(r["compute_s"], r["memory_s"]) for r in out)
    out.append({"stage": "total", **total})
    for r in out:
        r.setdefault("floor_s", max(r["compute_s"], r["memory_s"]))
        r["bound"] = "-" if r["stage"] == "total" else "compute" if r["compute_s"] >= r["memory_s"] else "memory"
        r["gflops"] = r["flops"] / r["seconds"] / 1e9 if r["seconds"] > 0 else 0.0
        r["peak_pct"] = 100 * r["gflops"] / peaks["fp32_gflops"]
        r["gbs"] = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] > 0 else 0.0
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}" if b > 0 else "-"


def table(result: dict, peaks: dict) -> str:
    """Markdown roofline table of one configuration."""
    lines = ["| stage | GFLOP | seconds | GFLOP/s | % fp32 peak | GB moved | GB/s | bound | floor s | seconds / floor "
             "| op floor s | seconds / op floor |", "|---|" + "---|" * 11]
    for r in rows(result, peaks):
        name = f"**{r['stage']}**" if r["stage"] == "total" else r["stage"]
        lines.append(f"| {name} | {r['flops'] / 1e9:.1f} | {r['seconds']:.2f} | {r['gflops']:.1f} | "
                     f"{r['peak_pct']:.0f} | {r['bytes'] / 1e9:.2f} | {r['gbs']:.1f} | {r['bound']} | "
                     f"{r['floor_s']:.2f} | {ratio(r['seconds'], r['floor_s'])} | {r['op_floor_s']:.2f} | "
                     f"{ratio(r['seconds'], r['op_floor_s'])} |")
    return "\n".join(lines)


def peaks_line(peaks: dict) -> str:
    d = peaks["detail"]
    return (f"Peaks ({peaks['threads']} threads, best of the repeats): fp32 GEMM {peaks['fp32_gflops']:.0f} GFLOP/s "
            f"(n = {', '.join(f'{n}: {v:.0f}' for n, v in d['fp32'].items())}), bf16 GEMM {peaks['bf16_gflops']:.0f} "
            f"GFLOP/s (reference; n = {', '.join(f'{n}: {v:.0f}' for n, v in d['bf16'].items())}), memory "
            f"bandwidth {peaks['bandwidth_gbs']:.1f} GB/s (copy {d['bandwidth']['copy']:.1f}, "
            f"add {d['bandwidth']['add']:.1f}; read + written)")


def report(results, peaks: dict) -> str:
    """The peaks line and one table per configuration, as markdown."""
    parts = [peaks_line(peaks)]
    for r in results:
        head = f"### {r['model']}, K = {r['K']}"
        if "seconds" not in r:
            parts.append(f"{head}: {r['error']}")
            continue
        total = rows(r, peaks)[-1]
        timed = len(r["all_seconds"])
        parts.append(f"{head}: {r['seconds']:.2f} s / image ({'median of ' + str(timed) if timed > 1 else 'one'} "
                     f"timed run{'s' if timed > 1 else ''}), {total['flops'] / 1e9:.0f} GFLOP, "
                     f"{total['bytes'] / 1e9:.1f} GB moved; floor {total['floor_s']:.2f} s, op floor "
                     f"{total['op_floor_s']:.2f} s; all FLOPs at the bf16 GEMM peak: "
                     f"{total['flops'] / 1e9 / peaks['bf16_gflops']:.2f} s\n\n{table(r, peaks)}")
    return "\n\n".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=".", help="checkout to measure (default: this one)")
    p.add_argument("--models", nargs="+", default=["B", "L", "CVPR24-B", "CVPR24-L"], choices=list(inference.MODELS))
    p.add_argument("--classes", nargs="+", type=int, default=[150, 847])
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median; warm-up when > 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-repeats", type=int, default=5, help="runs of each peak measurement (best reported)")
    p.add_argument("--memory-limit-gib", type=float, default=14.0,
                   help="address-space cap per configuration (0: none)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--write", help="append the markdown report to this file")
    p.add_argument("--opts", nargs="*", default=[], help="extra config overrides KEY VALUE ...")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peaks", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--peak-gflops", type=float, help=argparse.SUPPRESS)
    p.add_argument("--bandwidth-gbs", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.device = "cpu"
    if args.peaks:
        print(json.dumps(measure_peaks(args.threads, args.peak_repeats)))
        return
    if args.worker:
        args.classes = args.classes[0]
        print(json.dumps(worker(args)))
        return
    repo = str(Path(args.repo).resolve())
    peaks = inference.run_isolated([sys.executable, __file__, "--peaks", "--threads", str(args.threads),
                          "--peak-repeats", str(args.peak_repeats)], repo)
    if "error" in peaks:
        sys.exit(f"peak measurement failed: {peaks['error']}")
    print(json.dumps({"peaks": peaks}), flush=True)
    results = []
    for model in args.models:
        for k in args.classes:
            cmd = [sys.executable, __file__, "--worker", "--repo", repo, "--model", model, "--classes", str(k),
                   "--repeats", str(args.repeats), "--warmup", str(1 if args.repeats > 1 else 0),
                   "--threads", str(args.threads), "--peak-gflops", str(peaks["fp32_gflops"]),
                   "--bandwidth-gbs", str(peaks["bandwidth_gbs"]), "--opts", *args.opts]
            start = time.perf_counter()
            r = {"model": model, "K": k, **inference.run_isolated(cmd, repo, args.memory_limit_gib),
                 "process_s": time.perf_counter() - start}
            print(json.dumps(r), flush=True)
            results.append(r)
    text = report(results, peaks)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "results": results}, indent=1))
    if args.write:
        with open(args.write, "a") as f:
            f.write(f"\n## Roofline, {time.strftime('%Y-%m-%d')}: `{' '.join(sys.argv[1:])}`\n\n{text}\n")


if __name__ == "__main__":
    main()
