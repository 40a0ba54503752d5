"""The web demo under load: requests/s, p50/p95 latency and the server's peak RSS with 1, 4
and 8 clients, each sending --requests images one after the other (gradio_client, 127.0.0.1).

    .venv/bin/python benchmarks/web_load.py                    # prints the table
    .venv/bin/python benchmarks/web_load.py --write            # and appends it to benchmarks/RESULTS.md

The server is `demo/app.py` with the quick-start model (configs/quickstart.yaml): its trained
weights when `make demo` has written output/quickstart/model_final.pth, else random weights
(same network, same cost; the table says which). Default server settings (--concurrency 1:
one model pass at a time); --server-args adds others (before --opts: no --opts of its own).
Peak RSS: the server's resident memory sampled every 20 ms during each level (VmRSS), and its
all-time peak (VmHWM) after it.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from catseg.app.web import model_choices
from catseg.data.quickstart import CLASSES

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_WEIGHTS = REPO / "output" / "quickstart" / "model_final.pth"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def start_server(tmp: Path, extra):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--config-file", str(REPO / "configs" / "quickstart.yaml"), "--port", str(port)]
    args += ["--weights", str(QUICKSTART_WEIGHTS)] if QUICKSTART_WEIGHTS.is_file() else []
    classes = tmp / "classes.json"  # the quick-start's class list, without generating its data set
    classes.write_text(json.dumps(CLASSES))
    extra = [*extra, "--opts", "MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON", str(classes),
             "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", str(classes)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp)}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "demo" / "app.py"), *args, *extra], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / "server.log").read_text()[-3000:])
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.5)
    raise TimeoutError("server did not start")


def run_level(url: str, pid: int, choice: str, clients: int, requests: int, image: Path):
    """`clients` threads, each its own Client sending `requests` images in turn."""
    from gradio_client import Client, handle_file

    pool = [Client(url, verbose=False) for _ in range(clients)]
    latencies, lock, peak = [], threading.Lock(), [rss_mb(pid)]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.02)

    def client_loop(client):
        for _ in range(requests):
            t0 = time.perf_counter()
            status = client.predict(handle_file(str(image)), "sky; sand; sea; person", "", choice, False,
                                    api_name="/segment")[0]
            assert status.startswith("Done"), status
            with lock:
                latencies.append(time.perf_counter() - t0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in pool]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    q = statistics.quantiles(latencies, n=20)
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / wall,
            "p50": statistics.median(latencies), "p95": q[18], "peak_rss": peak[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=6, help="requests per client per level")
    p.add_argument("--size", type=int, nargs=2, default=[640, 480], help="test image W H")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more demo/app.py arguments")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args()
    weights = str(QUICKSTART_WEIGHTS) if QUICKSTART_WEIGHTS.is_file() else ""
    choice = next(iter(model_choices([str(REPO / "configs" / "quickstart.yaml")], [weights])[0]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "image.png"
        w, h = args.size
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image)
        proc, url = start_server(tmp, args.server_args)
        try:
            idle = rss_mb(proc.pid)
            run_level(url, proc.pid, choice, 1, 2, image)  # warm-up: text embeddings, first pass
            rows = [run_level(url, proc.pid, choice, c, args.requests, image) for c in args.clients]
            hwm = rss_mb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    trained = "trained (output/quickstart/model_final.pth)" if weights else "random weights: not trained here"
    lines = [f"Quick-start model ({trained}), {w}x{h} PNG, {args.requests} requests per client, "
             f"server settings: defaults{' ' + ' '.join(args.server_args) if args.server_args else ''} "
             f"(--concurrency 1). Server RSS idle after start: {idle:.0f} MB; all-time peak (VmHWM): {hwm:.0f} MB.",
             "", "| clients | requests | requests/s | p50 latency (s) | p95 latency (s) | peak RSS (MB) |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['clients']} | {r['requests']} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | "
              f"{r['peak_rss']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.write:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n# Web demo under load (benchmarks/web_load.py)\n\n## Run of {stamp}, {os.cpu_count()} CPUs "
                    "(shared with other jobs: absolute times are noisy; the ratios between levels are the point)\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
