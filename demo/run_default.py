"""`make demo`: the whole pipeline on a CPU in a few minutes, with no download.

1. generate the synthetic quick-start dataset (catseg/data/quickstart.py) if absent;
2. evaluate the untrained model on the val split (the number to beat);
3. train the quick-start model (configs/quickstart.yaml) with train_net.py;
4. evaluate it on the val split: per-class IoU table and mIoU;
5. segment the bundled sample images and a few val images with the trained model
   (demo/demo.py), writing overlays to output/demo/.
Run from anywhere; paths are resolved against the repository root.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = "datasets/quickstart"
CONFIG = "configs/quickstart.yaml"
OUT = "output/quickstart"


def stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


# detectron2 logs the whole model and config; show only progress lines (the full log of each
# train_net.py run is in its OUTPUT_DIR/log.txt).
PROGRESS = re.compile(r"iter: |Starting training|Total training time|Start inference|Total inference time|^error: ")


def run(args, progress_only: bool = False) -> None:
    print("$ " + " ".join(str(a) for a in args), flush=True)
    proc = subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if not progress_only or PROGRESS.search(line):
            print(line, end="", flush=True)
    if proc.wait():
        if progress_only:
            print("".join(tail), end="")
        raise subprocess.CalledProcessError(proc.returncode, args)


def print_iou_table(metrics_file: Path) -> float:
    """Print the per-class IoU table of an --eval-only run; return its mIoU."""
    metrics = json.loads(metrics_file.read_text())["sem_seg"]
    names = [k[len("IoU-"):] for k in metrics if k.startswith("IoU-")]
    width = max(len(n) for n in names)
    print(f"{'class'.ljust(width)}  IoU (%)")
    for name in names:
        print(f"{name.ljust(width)}  {metrics['IoU-' + name]:6.1f}")
    print(f"{'mIoU'.ljust(width)}  {metrics['mIoU']:6.1f}")
    return metrics["mIoU"]


def evaluate(weights: str, out: str) -> float:
    run(["train_net.py", "--config-file", CONFIG, "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out],
        progress_only=True)
    return print_iou_table(REPO / out / "metrics_eval.json")


def main() -> None:
    start = time.time()
    sys.path.insert(0, str(REPO))
    from catseg.data.quickstart import SPLITS, is_generated

    stage("1/5 quick-start data")
    if is_generated(REPO / DATA):
        print(f"{DATA} already there")
    else:
        print(f"writing a synthetic dataset ({SPLITS}) to {DATA}")
        run(["-m", "catseg.data.quickstart", "--out", DATA])

    stage("2/5 evaluating the untrained (seeded-random) model on the val split")
    untrained = evaluate("", f"{OUT}/eval_untrained")

    stage("3/5 training the quick-start model on the CPU (log: output/quickstart/log.txt)")
    run(["train_net.py", "--config-file", CONFIG, "OUTPUT_DIR", OUT, "TEST.EVAL_PERIOD", "0"], progress_only=True)

    stage("4/5 evaluating the trained model on the val split")
    weights = f"{OUT}/model_final.pth"
    trained = evaluate(weights, f"{OUT}/eval")
    print(f"val mIoU: untrained {untrained:.1f} -> trained {trained:.1f}")

    stage("5/5 segmenting sample and val images -> output/demo/")
    inputs = [str(p) for p in sorted((REPO / "demo" / "samples").glob("*")) if p.suffix in (".jpg", ".png")]
    inputs += [str(REPO / DATA / "images" / "val" / f"{i:04d}.png") for i in range(4)]
    run(["demo/demo.py", "--config-file", CONFIG, "--input", *inputs, "--output", "output/demo",
         "--vocab-file", f"{DATA}/classes.json", "--opts", "MODEL.WEIGHTS", weights])
    print(f"\ndone in {time.time() - start:.0f} s; overlays in output/demo/")


if __name__ == "__main__":
    os.chdir(REPO)
    main()
