"""Batch labelling speed (catseg-label): images/s with 1 and 2 processes and 0 vs 2 loader
workers, against the network alone.

Protocol: synthetic 320x240 JPEGs, K = 150 classes (the ADE-150 names), random weights:
- "quickstart": configs/quickstart.yaml, the quick-start model (tiny, 128x128 network input),
  64 images in batches of 4;
- "cvpr24-b": configs/cvpr24/vitb_384.yaml, CAT-Seg CVPR'24 B, CLIP_WEIGHTS random (no
  download), 8 images in batches of 1.
catseg-label deals out blocks of 4 batches to the processes, so both give each of 2 processes
the same number of blocks.
Each configuration is one `demo/label.py` run in its own process (launcher included); its
images/s is OUT/summary.json's: images labelled / seconds of the labelling loop (after the
model is built and the text embeddings computed, DataLoader start-up included), per process
and in total (total images / the slowest process's seconds). "network only" segments the same
images, decoded beforehand and held in memory, with OpenVocabPredictor.run in batches: the rate
the loader workers should reach. Same batch size everywhere; CPU threads per process:
`--threads` (default: catseg-label's, cores / processes; the network-only run then uses all).

    python benchmarks/batch.py                       # both models, markdown tables on stdout
    python benchmarks/batch.py --models quickstart --images 64
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
MODELS = {  # name: (config, opts, images, batch size)
    "quickstart": ("configs/quickstart.yaml", [], 64, 4),
    "cvpr24-b": ("configs/cvpr24/vitb_384.yaml", ["MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "random"], 8, 1),
}
CLASSES = ["MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON", "ade150", "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", "ade150"]
RUNS = [(1, 0), (1, 2), (2, 0), (2, 2)]  # (processes, loader workers)


def make_images(folder: Path, count: int, size=(240, 320)) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    h, w = size
    for i in range(count):
        base = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        image = np.kron(base, np.ones((16, 16, 1), np.uint8)) + rng.integers(0, 32, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"img{i:04d}.jpg", quality=90)


def label_run(model: str, images: Path, out: Path, processes: int, workers: int, batch: int, threads: int) -> dict:
    config, opts, _, _ = MODELS[model]
    args = [sys.executable, str(REPO / "demo" / "label.py"), "--config-file", str(REPO / config),
            "--input", str(images), "--output", str(out), "--dataset-vocab", "ade150", "--batch-size", str(batch),
            "--num-gpus", str(processes), "--loader-workers", str(workers), "--threads", str(threads),
            "--opts", *opts, *CLASSES, "MODEL.DEVICE", "cpu"]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if not (out / "summary.json").exists():
        raise SystemExit(f"{model} {processes}x{workers} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def network_only(model: str, images: Path, batch: int, threads: int) -> float:
    """Images/s of OpenVocabPredictor.run over images decoded beforehand (this process)."""
    sys.path.insert(0, str(REPO))
    import torch

    if threads:
        torch.set_num_threads(threads)
    from catseg.app.predictor import OpenVocabPredictor
    from catseg.config import load_config
    from catseg.data.class_names import load_class_names

    config, opts, _, _ = MODELS[model]
    torch.manual_seed(0)
    cfg = load_config(str(REPO / config), [*opts, *CLASSES, "MODEL.DEVICE", "cpu"])
    predictor = OpenVocabPredictor(cfg, batch_size=batch)
    predictor.set_vocabulary(load_class_names("ade150"))
    prepared = [predictor.prepare(p) for p in sorted(images.iterdir())]
    predictor.run(prepared[:1])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prepared), batch):
        predictor.run(prepared[i:i + batch])
    return len(prepared) / (time.perf_counter() - start)


def table(model: str, count: int, batch: int, rows, net: float, threads: int) -> str:
    lines = [f"{model}, {count} images 320x240, K = 150, batch {batch}, "
             f"{f'{threads} thread(s)' if threads else 'default threads'} per process: network only {net:.2f} images/s",
             "", "| processes | loader workers | images/s total | images/s per process | total vs network only |",
             "|---|---|---|---|---|"]
    for (processes, workers), summary in rows:
        per = " / ".join(f"{p['images_per_s']:.2f}" for p in summary["processes"])
        lines.append(f"| {processes} | {workers} | {summary['images_per_s']:.2f} | {per} | "
                     f"{summary['images_per_s'] / net:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--images", type=int, default=0, help="images per model (default: the protocol's)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process, network only included (default: catseg-label's, cores / processes)")
    p.add_argument("--network-only", nargs=3, metavar=("MODEL", "FOLDER", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.network_only:
        model, folder, batch = args.network_only
        print(network_only(model, Path(folder), int(batch), args.threads))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            _, _, count, batch = MODELS[model]
            count = args.images or count
            images = Path(tmp) / model / "images"
            make_images(images, count)
            net = float(subprocess.run([sys.executable, __file__, "--network-only", model, str(images), str(batch),
                                        "--threads", str(args.threads)],
                                       capture_output=True, text=True, check=True).stdout.split()[-1])
            rows = [((n, w), label_run(model, images, Path(tmp) / model / f"out_{n}x{w}", n, w, batch, args.threads))
                    for n, w in RUNS]
            print(table(model, count, batch, rows, net, args.threads) + "\n", flush=True)


if __name__ == "__main__":
    main()
