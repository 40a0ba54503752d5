"""Quick-start training in fp32 and under bfloat16 autocast (SOLVER.AMP.ENABLED): loss curve, speed, mIoU.

Usage: python benchmarks/amp_training.py [--threads 2] [--iters 400] [--out benchmarks/amp_training.md]

Protocol: the quick-start recipe of `make demo` (configs/quickstart.yaml on the synthetic dataset
of catseg/data/quickstart.py, generated into datasets/quickstart when absent; TEST.EVAL_PERIOD 0,
so the model is evaluated on the val split once, after the last iteration, in fp32 for both runs)
is trained twice from the same seed (SEED 0: same initial weights, same batches and
augmentations): once in fp32, once with SOLVER.AMP.ENABLED True. Each run is its own subprocess
(this script with --run), one after the other, with torch.set_num_threads(--threads) and an empty
text-embedding cache of its own; outputs in output/amp_training/{fp32,bf16} (replaced).

Reported: the training loss (total_loss) at iterations 20, 40, ...: the mean of the 20
iterations up to there, from each run's per-iteration history (detectron2's metrics.json has
one line per 20 iterations only, holding the median of those 20; the runs write their
per-iteration history to iterations.json beside it); seconds per iteration (mean step time of
detectron2's IterationTimer, first 3 iterations left out as detectron2 does); their ratio; the
final val mIoU from metrics.json.

bf16 training is approximate: the forward's matrix products and convolutions take bf16 inputs
(8-bit mantissa), so the runs part after the first step and their losses and mIoU differ by
more than run-to-run noise of fp32 (which is zero: CPU fp32 training here is deterministic).
Its speed depends on the CPU's bf16 support (AVX512-BF16 / AMX); without it, bf16 can be
slower than fp32. Timing is sensitive to other load on the machine: the two runs are sequential.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"
DATA = "datasets/quickstart"
OUT = "output/amp_training"
RUNS = {"fp32": False, "bf16": True}
WINDOW = 20  # loss smoothing window and table step (iterations)
TIMER_WARMUP = 3  # detectron2's IterationTimer leaves out this many first iterations


def run_one(name: str, iters: int, threads: int) -> None:
    """Child process: train the quick-start recipe (as train_net.py does) with AMP on or off and
    write the per-iteration total_loss and step time to OUTPUT_DIR/iterations.json."""
    import torch
    torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    from catseg.console import setup_cli_logging
    from catseg.engine import CATSegTrainer
    from catseg.engine.run_setup import setup_run

    setup_cli_logging()
    args = train_net.build_parser().parse_args([
        "--config-file", CONFIG, "OUTPUT_DIR", f"{OUT}/{name}", "TEST.EVAL_PERIOD", "0",
        "SOLVER.MAX_ITER", str(iters), "SOLVER.AMP.ENABLED", str(RUNS[name])])
    cfg = train_net.prepare_config(args)
    setup_run(cfg, args)
    trainer = CATSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = {key: [v for v, _ in trainer.storage.history(key).values()] for key in ("total_loss", "time")}
    (REPO / OUT / name / "iterations.json").write_text(json.dumps(history))


def launch(name: str, iters: int, threads: int) -> None:
    out = REPO / OUT / name
    shutil.rmtree(out, ignore_errors=True)  # detectron2 appends to an existing metrics.json
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="catseg-amp-bench-cache-") as cache:
        env["CATSEG_CACHE"] = cache
        print(f"training {name} ({iters} iterations, {threads} threads) -> {out}", flush=True)
        subprocess.run([sys.executable, __file__, "--run", name, "--iters", str(iters), "--threads", str(threads)],
                       cwd=REPO, env=env, check=True)


def results(name: str) -> dict:
    """{"loss": per-iteration total_loss, "s_per_iter", "miou" (None without evaluation)}."""
    out = REPO / OUT / name
    history = json.loads((out / "iterations.json").read_text())
    times = history["time"][TIMER_WARMUP:]
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    miou = [line["sem_seg/mIoU"] for line in lines if "sem_seg/mIoU" in line]
    return {"loss": history["total_loss"], "s_per_iter": sum(times) / len(times), "miou": miou[-1] if miou else None}


def machine() -> str:
    """CPU model, cores, the CPU's bf16 instructions, torch version."""
    import platform

    import torch
    model, flags = platform.processor() or platform.machine(), set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    bf16 = " ".join(sorted(flags & {"avx512_bf16", "amx_bf16"})) or "none found"
    return f"{model}, {os.cpu_count()} cores, CPU bf16 instructions: {bf16}; torch {torch.__version__}"


def table(res: dict, iters: int, threads: int) -> str:
    fp32, bf16 = res["fp32"], res["bf16"]
    rows = ["| iteration | fp32 loss | bf16 loss | bf16 - fp32 |", "|---:|---:|---:|---:|"]
    for it in range(WINDOW, iters + 1, WINDOW):
        a, b = (sum(r["loss"][it - WINDOW:it]) / WINDOW for r in (fp32, bf16))
        rows.append(f"| {it} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    ratio = bf16["s_per_iter"] / fp32["s_per_iter"]

    def miou(r):
        return "n/a" if r["miou"] is None else f"{r['miou']:.1f}"
    summary = ["| | fp32 | bf16 (SOLVER.AMP.ENABLED) | bf16 / fp32 |", "|---|---:|---:|---:|",
               f"| s / iteration ({threads} thread{'s' if threads > 1 else ''}) | {fp32['s_per_iter']:.4f} | "
               f"{bf16['s_per_iter']:.4f} | {ratio:.2f} |",
               f"| final val mIoU | {miou(fp32)} | {miou(bf16)} | |"]
    return "\n".join([
        f"Quick-start ({CONFIG}), {iters} iterations, same seed, fp32 vs bf16 autocast training "
        f"(`python benchmarks/amp_training.py --threads {threads}`). Loss: mean total_loss of the "
        f"{WINDOW} iterations up to each row. Machine: {machine()}.", "", *rows, "", *summary, ""])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run (default 2)")
    parser.add_argument("--iters", type=int, default=400, help="iterations (default 400: the quick-start recipe)")
    parser.add_argument("--out", default="benchmarks/amp_training.md", help="markdown output file")
    parser.add_argument("--run", choices=sorted(RUNS), help=argparse.SUPPRESS)  # internal: one child run
    args = parser.parse_args()
    out_file = Path(args.out).resolve()
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))  # this checkout's catseg, in the parent and in each run
    if args.run:
        return run_one(args.run, args.iters, args.threads)
    if args.iters < WINDOW:
        parser.error(f"--iters must be at least {WINDOW}")
    from catseg.data.quickstart import generate, is_generated
    if not is_generated(DATA):
        print(f"writing the quick-start dataset to {DATA}", flush=True)
        generate(DATA)
    for name in RUNS:
        launch(name, args.iters, args.threads)
    markdown = table({name: results(name) for name in RUNS}, args.iters, args.threads)
    print(markdown)
    out_file.write_text(markdown)
    print(f"written to {out_file}")


if __name__ == "__main__":
    main()
