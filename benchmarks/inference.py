"""Inference speed / memory table for CAT-Seg (B) and (L) at several vocabulary sizes.

Protocol: random weights at the real B / L sizes (v1, and CVPR'24 as CVPR24-B / CVPR24-L), one synthetic 512x683 image,
the official evaluation protocol (sliding window, POOLING_SIZES [1, 1]), 2 threads. Text encoding is excluded
from the timing: random unit-norm text features (T, P, C) are put in the predictor's cache; the
cost of encoding is measured separately (seconds per class, all templates, empty text cache).

Every (code version, model, K) runs in its own subprocess, so peak memory (CPU: ru_maxrss,
weights included; CUDA: max allocated) belongs to that configuration alone, and two versions
of the package never share an interpreter. A version is a repository path (`--repo
name=PATH`): compare the working tree with the baseline, commit 6ef4558 (the first
implementation), checked out in a git worktree:

    git worktree add /tmp/catseg-baseline 6ef4558
    python benchmarks/inference.py --repo baseline=/tmp/catseg-baseline --repo current=.

Per-stage seconds come from hooks around the modules of each stage (summed over calls, so a
stage run over class chunks is still counted once per image); "post" is everything outside
CLIP, backbone and aggregator (normalisation, resizing, sliding-window merge, post-processing),
"agg_other" the cost volume, its embedding and the guidance projections.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"B": "vitb_r101_384.yaml", "L": "vitl_swinb_384.yaml",
          "CVPR24-B": "cvpr24/vitb_384.yaml", "CVPR24-L": "cvpr24/vitl_336.yaml"}
STAGES = ("clip", "guidance", "spatial", "class", "decoder", "agg_other", "post")


def build(repo: Path, model: str, device: str, opts):
    """The model of `repo` in eval mode, built from its own config files."""
    sys.path.insert(0, str(repo))
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from catseg import add_catseg_config

    cfg = get_cfg()
    add_catseg_config(cfg)
    cfg.merge_from_file(str(repo / "configs" / MODELS[model]))
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "random", "TEST.SLIDING_WINDOW", "True",
                         "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1, 1]", "MODEL.DEVICE", device, *opts])
    return build_model(cfg).eval()


class StageTimer:
    """Accumulates wall time per stage from forward pre/post hooks (CUDA-synchronised).
    `clock` can be any other running count (benchmarks/roofline.py counts FLOPs and bytes with it)."""

    def __init__(self, device: str, clock=time.perf_counter):
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.clock = clock
        self.totals = dict.fromkeys(STAGES, 0.0)

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = self.clock()
            out = fn(*args, **kwargs)
            self.sync()
            self.totals[stage] += self.clock() - start
            return out
        return timed

    def hook(self, stage: str, module):
        starts = []

        def pre(*_):
            self.sync()
            starts.append(self.clock())

        def post(*_):
            self.sync()
            self.totals[stage] += self.clock() - starts.pop()
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def stage_modules(model):
    """Which module is which stage: (stage, module) pairs. "guidance" is the v1 backbone or the
    CVPR'24 upsamplers; the aggregator as a whole is "agg_other" (its parts are subtracted in
    `stage_seconds`); everything outside these modules is "post". Versions before the
    DenseCLIPEncoder (e.g. the baseline) have no "clip" module, see `instrument`."""
    pairs = [("clip", model.clip_encoder)] if hasattr(model, "clip_encoder") else []
    pairs += [("guidance", getattr(model, name)) for name in ("backbone", "upsample1", "upsample2")
              if hasattr(model, name)]
    agg = model.sem_seg_head.predictor.transformer
    pairs.append(("agg_other", agg))
    for layer in agg.layers:
        pairs += [("spatial", layer.swin_block), ("class", layer.attention)]
    pairs += [("decoder", module) for module in (agg.decoder1, agg.decoder2, agg.head)]
    return pairs


def instrument(model, timer: StageTimer) -> None:
    """Hooks every stage of `model` (`stage_modules`). Versions before the DenseCLIPEncoder
    (e.g. the baseline) have a module function for the dense CLIP pass: it is wrapped instead."""
    import catseg.modeling.meta_arch as meta_arch

    if not hasattr(model, "clip_encoder"):
        meta_arch.encode_image_dense = timer.wrap("clip", meta_arch.encode_image_dense)
    for stage, module in stage_modules(model):
        timer.hook(stage, module)


def stage_seconds(totals, total: float):
    """Per-stage totals of `StageTimer` (of any clock) -> exclusive per-stage amounts summing to `total`."""
    out = dict(totals)
    out["agg_other"] = out["agg_other"] - (out["spatial"] + out["class"] + out["decoder"])
    out["post"] = total - sum(out.values())  # "post" is still 0 here
    return out


def worker(args) -> dict:
    """One configuration in this process; returns its measurements."""
    import torch

    opts = list(args.opts)
    if args.text_classes:  # an empty on-disk text cache: time the encoding, not a cache hit
        opts += ["MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR", tempfile.mkdtemp(prefix="catseg-bench-text-")]
    model, names = load(args, opts)
    if args.text_classes:  # cost of encoding the text of a few classes, all templates
        start = time.perf_counter()
        with torch.no_grad():
            model.sem_seg_head.predictor.text_features(names[: args.text_classes])
        return {"text_s_per_class": (time.perf_counter() - start) / args.text_classes}
    return time_stages(model, cached_input(model, names, args.device), args)


def load(args, opts):
    """`args.threads` threads, seed 0, the model of `args.repo` / `args.model` with `args.classes` test classes."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(Path(args.repo).resolve(), args.model, args.device, opts)
    names = [f"class {i}" for i in range(args.classes)]
    model.sem_seg_head.predictor.set_test_classes(names)
    return model, names


def cached_input(model, names, device: str):
    """Random unit-norm text features of `names` in the predictor's cache; the one-image batch."""
    import torch

    predictor = model.sem_seg_head.predictor
    width = predictor.clip_model.text_projection.shape[-1]
    text = torch.randn(len(names), len(predictor.prompt_templates), width, device=device)
    predictor._text_cache[tuple(names)] = torch.nn.functional.normalize(text, dim=-1)
    image = torch.randint(0, 256, (3, 512, 683), generator=torch.Generator().manual_seed(0)).float()
    return [{"image": image, "height": 512, "width": 683}]


def time_stages(model, batch, args) -> dict:
    """`args.warmup` untimed and `args.repeats` timed forwards of `batch`, hooked per stage."""
    import torch

    device = args.device
    timer = StageTimer(device)
    instrument(model, timer)
    rss_model = peak_rss_gib()
    times, cpu, stages = [], [], []
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            timer.totals = dict.fromkeys(STAGES, 0.0)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timer.sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            model(batch)
            timer.sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
                stages.append(stage_seconds(timer.totals, times[-1]))
    median = statistics.median(times)
    stage = (stages[times.index(median)] if len(times) % 2
             else {k: statistics.median(s[k] for s in stages) for k in STAGES})
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else peak_rss_gib()
    return {"seconds": median, "all_seconds": times, "cpu_seconds": statistics.median(cpu), "peak_gib": peak,
            "weights_rss_gib": rss_model, "stages": stage}


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_isolated(cmd, repo: str, limit_gib: float = 0) -> dict:
    """Runs `cmd` in a fresh interpreter with `repo` first on the path, under an address-space
    cap of `limit_gib` (0: none; keeps an out-of-memory configuration from starving the
    machine); returns its last JSON line, or {"error": ...}."""
    def cap():
        if limit_gib:
            resource.setrlimit(resource.RLIMIT_AS, (int(limit_gib * 2**30),) * 2)
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, cwd=repo,
                          env={**os.environ, "PYTHONPATH": repo})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": "out of memory" if "alloc" in tail.lower() or "memory" in tail.lower() else tail[-160:]}
    return json.loads(lines[-1])


def run_config(args, repo: str, model: str, classes: int, repeats: int, text_classes: int = 0) -> dict:
    """Runs `worker` in a fresh interpreter (own RSS, own import of `repo`). CUDA reserves more
    address space than any sensible cap, so the cap applies on CPU only."""
    cmd = [sys.executable, __file__, "--worker", "--repo", repo, "--model", model, "--classes", str(classes),
           "--repeats", str(repeats), "--warmup", str(1 if repeats > 1 else 0), "--threads", str(args.threads),
           "--device", args.device, "--text-classes", str(text_classes), "--opts", *args.opts]
    return run_isolated(cmd, repo, args.memory_limit_gib if args.device == "cpu" else 0)


def table(results) -> str:
    """Markdown table of the result rows."""
    head = ("| model | K | version | s / image | CPU s / image | peak GiB | " + " | ".join(STAGES) + " | speedup |\n"
            "|---|---|---|---|---|---|" + "---|" * len(STAGES) + "---|")
    rows = [head]
    base = {(r["model"], r["K"]): r for r in results if r["version"] == results[0]["version"] and "seconds" in r}
    for r in results:
        if "seconds" not in r:
            rows.append(f"| {r['model']} | {r['K']} | {r['version']} | {r['error']} | | | "
                        + " | " * len(STAGES) + " |")
            continue
        ref = base.get((r["model"], r["K"]))
        speedup = (f"{ref['seconds'] / r['seconds']:.2f}x (CPU {ref['cpu_seconds'] / r['cpu_seconds']:.2f}x)"
                   if ref else "-")
        rows.append(f"| {r['model']} | {r['K']} | {r['version']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                    f"{r['peak_gib']:.2f} | "
                    + " | ".join(f"{r['stages'][s]:.2f}" for s in STAGES) + f" | {speedup} |")
    return "\n".join(rows)


def slopes(results, key: str = "seconds") -> str:
    """Least-squares fit of `key` (seconds or cpu_seconds per image) against K, per (model, version)."""
    lines = []
    for group in sorted({(r["model"], r["version"]) for r in results}):
        pts = [(r["K"], r[key]) for r in results if (r["model"], r["version"]) == group and "seconds" in r]
        if len(pts) < 2:
            continue
        mk = sum(k for k, _ in pts) / len(pts)
        ms = sum(s for _, s in pts) / len(pts)
        slope = sum((k - mk) * (s - ms) for k, s in pts) / sum((k - mk) ** 2 for k, _ in pts)
        resid = max(abs(s - (ms + slope * (k - mk))) for k, s in pts)
        lines.append(f"- {group[0]} {group[1]}: {slope * 1000:.1f} ms per class, intercept {ms - slope * mk:.2f} s, "
                     f"max residual {resid:.2f} s over K = {[k for k, _ in pts]}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", action="append", default=[],
                   help="name=PATH of a checkout (repeatable); default current=.")
    p.add_argument("--models", nargs="+", default=["B", "L", "CVPR24-B", "CVPR24-L"], choices=list(MODELS))
    p.add_argument("--classes", nargs="+", type=int, default=[20, 59, 150, 459, 847])
    p.add_argument("--repeats", type=int, default=3, help="timed runs for K <= --many-classes (median reported)")
    p.add_argument("--many-classes", type=int, default=59, help="above this K a single timed run, no warm-up")
    p.add_argument("--reference-max-classes", type=int, default=0,
                   help="run the first --repo only up to this K (0: always), e.g. a baseline that cannot fit large K")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--memory-limit-gib", type=float, default=14.0,
                   help="address-space cap per CPU configuration (0: none)")
    p.add_argument("--text-classes", type=int, default=1, help="classes encoded to time text encoding (0: skip)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--opts", nargs="*", default=[], help="extra config overrides KEY VALUE ...")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.repo, args.classes = args.repo[0], args.classes[0]
        print(json.dumps(worker(args)))
        return
    repos = [r.split("=", 1) for r in (args.repo or ["current=."])]
    results = []
    for model in args.models:
        for k in args.classes:
            for j, (name, path) in enumerate(repos):
                if j == 0 and len(repos) > 1 and 0 < args.reference_max_classes < k:
                    continue
                repeats = args.repeats if k <= args.many_classes else 1
                r = {"model": model, "K": k, "version": name,
                     **run_config(args, str(Path(path).resolve()), model, k, repeats)}
                print(json.dumps(r), flush=True)
                results.append(r)
    text = {}
    if args.text_classes:
        for model in args.models:
            name, path = repos[-1]
            text[model] = run_config(args, str(Path(path).resolve()), model, args.text_classes, 1, args.text_classes)
    print(table(results))
    print("\nSeconds per image against K (least squares):\n" + slopes(results))
    print("\nCPU seconds per image against K (least squares):\n" + slopes(results, "cpu_seconds"))
    for model, r in text.items():
        print(f"\nText encoding ({model}, {repos[-1][0]}): {r.get('text_s_per_class', r.get('error'))} s per class")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "text": text}, indent=1))


if __name__ == "__main__":
    main()
