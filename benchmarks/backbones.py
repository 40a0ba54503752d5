"""Parameters, GFLOPs (fvcore) at 384x384 and CPU forward time of the full-size guidance backbones.

Usage: python benchmarks/backbones.py [--threads 2] [--runs 3]
Builds each backbone from its configs/backbones/*.yaml fragment (without _BASE_ and without
downloading weights: timing and FLOPs do not depend on them) with outputs res2..res4, as CATSeg
uses them. fvcore counts one multiply-add as one flop; attention (scaled_dot_product_attention,
which fvcore does not know) is counted as QK^T plus AV multiply-adds.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_backbone
from fvcore.nn import FlopCountAnalysis

from catseg import add_catseg_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "backbones"
ROWS = [
    ("ViT-B/16 + simple pyramid", "vit.yaml", {}),
    ("Twins-SVT-B", "twins_svt.yaml", {}),
    ("Twins-PCPVT-B", "twins_pcpvt.yaml", {}),
    ("cluster_tiny", "cluster_tiny.yaml", {}),
    ("cluster_small", "cluster_tiny.yaml", {"MODEL.CLUSTER.VARIANT": "cluster_small"}),
]


def backbone_cfg(fragment_file: str, overrides: dict):
    """Default catseg cfg + a backbone fragment, no weight download."""
    cfg = get_cfg()
    add_catseg_config(cfg)
    fragment = yaml.safe_load((CONFIGS / fragment_file).read_text())
    fragment.pop("_BASE_")
    cfg.merge_from_other_cfg(CfgNode(fragment))
    cfg.MODEL.VIT.PRETRAINED = cfg.MODEL.TWINS.PRETRAINED = False
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def sdpa_flops(inputs, outputs):
    """Multiply-adds of softmax(QK^T)V for q (..., Lq, d), k (..., Lk, d), v (..., Lk, dv)."""
    q, k, v = (i.type().sizes() for i in inputs[:3])
    batch = 1
    for n in q[:-2]:
        batch *= n
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def measure(backbone, x, runs: int):
    flops = FlopCountAnalysis(backbone, x).set_op_handle("aten::scaled_dot_product_attention", sdpa_flops)
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    gflops = flops.total() / 1e9
    times = []
    with torch.no_grad():
        backbone(x)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            backbone(x)
            times.append(time.perf_counter() - start)
    return gflops, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, 384, 384)
    print(f"| backbone | registry name | params (M) | GFLOPs @384 | CPU forward (s, {args.threads} threads) |")
    print("|---|---|---|---|---|")
    for label, fragment, overrides in ROWS:
        cfg = backbone_cfg(fragment, overrides)
        torch.manual_seed(0)
        backbone = build_backbone(cfg).eval()
        params = sum(p.numel() for p in backbone.parameters()) / 1e6
        gflops, seconds = measure(backbone, x, args.runs)
        print(f"| {label} | {cfg.MODEL.BACKBONE.NAME} | {params:.1f} | {gflops:.1f} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
