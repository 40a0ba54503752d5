"""Start-up cost of a released model: seconds to imports, build, load and the first image, and
peak RSS, for today's build-then-load beside the build straight from the checkpoint
(catseg/modeling/build.py), each in its own fresh process.

    .venv/bin/python benchmarks/startup.py                       # CVPR'24 L and v1 L
    .venv/bin/python benchmarks/startup.py --models cvpr24-large --repeats 2

The checkpoints are local files in the official format (random weights of the real-size model,
saved as detectron2 saves them: {"model": state_dict, "iteration": ...}), written once into
--checkpoint-dir. Variants:
- build-then-load (the way before issue 22): every tensor allocated and randomly initialised
  (CLIP with random weights: the CLIP download it did on a first start is not counted), then
  the whole file read into memory (torch.load without mapping) and copied into the model;
- direct: `build_from_checkpoint` with the config as shipped (CLIP_WEIGHTS "pretrained") and
  HF_HUB_OFFLINE=1: the checkpoint's keys are read first, CLIP is not downloaded, the large
  tensors are never created, the model's tensors are the memory-mapped file's.
Columns: imports (torch, detectron2, catseg), build, load (for direct, build and load are one
step, shown under build), ready = imports + build + load, first image (a 640x480 image, 3
classes, text embeddings included), RSS after the imports, peak RSS after loading (before
inference) and after the first image (VmHWM of the worker process), and the ratio of the peak
before inference to the checkpoint's size, whole and without what the imports hold. The
checkpoint is written by a process of its own, so no worker inherits its memory.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"cvpr24-large": "cvpr24/vitl_336.yaml", "v1-large": "vitl_swinb_384.yaml"}
VARIANTS = ("build-then-load", "direct")


RANDOM_CLIP = ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "random"]


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over an exec
    from the forked parent's pages, so a worker would report the parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(variant: str, config: str, weights: str) -> dict:
    """One start-up in this (fresh) process; returns the timings."""
    t0 = time.perf_counter()
    import torch
    from detectron2.modeling import build_model

    from catseg.config import load_config, shipped_config
    from catseg.modeling.build import build_from_checkpoint
    from catseg.weights.checkpointer import CATSegCheckpointer
    t1 = time.perf_counter()
    rss_imports = peak_rss_bytes()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if variant == "build-then-load":
        cfg = load_config(str(shipped_config(config)), RANDOM_CLIP)
        model = build_model(cfg)
        t2 = time.perf_counter()
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)  # read whole, as before
        CATSegCheckpointer(model, preloaded=checkpoint).load(weights)
        del checkpoint
    else:
        cfg = load_config(str(shipped_config(config)), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights])
        model = build_from_checkpoint(cfg)
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    rss_ready = peak_rss_bytes()
    model.eval()
    model.sem_seg_head.predictor.set_test_classes(["sky", "grass", "building"])
    image = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        model([{"image": image, "height": 480, "width": 640}])
    t4 = time.perf_counter()
    return {"imports_s": t1 - t0, "build_s": t2 - t1, "load_s": t3 - t2, "ready_s": t3 - t0,
            "first_image_s": t4 - t3, "rss_imports": rss_imports, "rss_ready": rss_ready,
            "rss_first_image": peak_rss_bytes()}


def make_checkpoint(config: str, path: Path) -> dict:
    """Random real-size weights of `config`, saved as detectron2 saves a checkpoint."""
    import torch
    from detectron2.modeling import build_model

    from catseg.config import load_config, shipped_config

    cfg = load_config(str(shipped_config(config)), RANDOM_CLIP)
    torch.manual_seed(0)
    model = build_model(cfg)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "iteration": 0}, tmp)
    os.replace(tmp, path)
    return {}


def run_worker(*args: str) -> dict:
    """This script with `args` in a fresh process (offline); its last stdout line as JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1200)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=1, help="runs of each variant (the fastest is shown)")
    p.add_argument("--checkpoint-dir", default=str(Path(tempfile.gettempdir()) / "catseg-startup-bench"))
    p.add_argument("--worker", choices=VARIANTS + ("checkpoint",), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "checkpoint":
        print(json.dumps(make_checkpoint(args.config, Path(args.weights))))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.config, args.weights)))
        return
    sys.path.insert(0, str(REPO))
    folder = Path(args.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    print("| model | variant | imports s | build s | load s | ready s | first image s | RSS after imports GiB "
          "| peak RSS ready GiB | after first image GiB | RSS ready / checkpoint "
          "| (RSS ready - imports) / checkpoint |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    gib = 2 ** 30
    for name in args.models:
        weights = folder / f"{name}.pth"
        if not weights.is_file():
            print(f"writing {weights} (random weights) ...", file=sys.stderr, flush=True)
            run_worker("--worker", "checkpoint", "--config", MODELS[name], "--weights", str(weights))
        size = weights.stat().st_size
        results = {}
        for variant in VARIANTS:
            runs = [run_worker("--worker", variant, "--config", MODELS[name], "--weights", str(weights))
                    for _ in range(args.repeats)]
            r = results[variant] = min(runs, key=lambda x: x["ready_s"])
            print(f"| {name} ({size / gib:.2f} GiB file) | {variant} | {r['imports_s']:.1f} | {r['build_s']:.1f} | "
                  f"{r['load_s']:.1f} | {r['ready_s']:.1f} | {r['first_image_s']:.1f} | {r['rss_imports'] / gib:.2f} | "
                  f"{r['rss_ready'] / gib:.2f} | {r['rss_first_image'] / gib:.2f} | {r['rss_ready'] / size:.2f} | "
                  f"{(r['rss_ready'] - r['rss_imports']) / size:.2f} |", flush=True)
        old, new = results["build-then-load"], results["direct"]
        print(f"| {name} | direct / build-then-load | | {new['build_s'] / (old['build_s'] + old['load_s']):.2f} "
              f"(build + load) | | {new['ready_s'] / old['ready_s']:.2f} | | | "
              f"{new['rss_ready'] / old['rss_ready']:.2f} | | | |", flush=True)


if __name__ == "__main__":
    main()
