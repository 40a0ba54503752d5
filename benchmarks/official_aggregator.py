"""Official CAT-Seg aggregator (v1, CVPR'24) against ours: same weights, same inputs, output difference, time, peak RSS.

The official code is NOT part of this repository and is never copied into it. Get it yourself
and pass its root (the directory that contains `cat_seg/`):

    git clone https://github.com/cvlab-kaist/CAT-Seg /tmp/CAT-Seg
    python benchmarks/official_aggregator.py --official /tmp/CAT-Seg --models B L --classes 150

Only `cat_seg/modeling/transformer/model.py` is imported from it (it needs torch, einops and
timm). The current official `Aggregator` (CVPR'24) has a `pad_len` argument: it gets our
aggregator's `pad_length`, 256 for the CVPR'24 models and 0 (no class padding, no selection:
the v1 computation) for the v1 ones; an older checkout without `pad_len` serves v1 only.

Protocol, per model (B, L, CVPR24-B, CVPR24-L: the configs of benchmarks/inference.py):
- a setup process builds our model as benchmarks/inference.py does (random weights, evaluation
  protocol: POOLING_SIZES [1, 1]) and saves its aggregator (`sem_seg_head.predictor.transformer`),
  the official constructor arguments read from it, and seeded random inputs for `--views` views:
  dense CLIP features (V, C, H, W), unit-norm text features (T, P, C) and backbone guidance
  deepest first (V, G0, H, W), (V, G1, 2H, 2W), (V, G2, 4H, 4W);
- every (model, K, implementation) then runs in its own process (own ru_maxrss): the official
  `Aggregator` is built from those arguments and loaded with our state_dict (strict: the keys are
  identical by design); each side gets the text features the way its own predictor builds them
  (official: `repeat` over views, ours: `expand`), both normalise image and text inside;
- both processes import the same modules and load the same setup file, so their baselines match;
- the parent compares the two (V, T, 4H, 4W) logits (max abs difference) and prints a table.

Seconds: median of `--repeats` timed forwards under `torch.inference_mode()` (one untimed
warm-up when repeats > 1), `--threads` threads. With `--rounds N` the two implementations run N
times each, alternating (official first in odd rounds, ours first in even ones), so that a
machine whose speed drifts over minutes weighs on both alike; each round gives a speed ratio
(official seconds / ours), and the summary line reports their median and range.
"""
import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import MODELS, build, peak_rss_gib, run_isolated  # noqa: E402  (sibling benchmark script)

IMPLEMENTATIONS = ("official", "ours")
OFFICIAL_MODULE = "cat_seg.modeling.transformer.model"


def official_kwargs(agg) -> dict:
    """Constructor arguments of the official v1 `Aggregator` equal to our built `agg` (evaluation pooling)."""
    hidden = agg.conv1.out_channels
    layer = agg.layers[0]
    block = layer.swin_block.block_1
    ups = (agg.decoder1, agg.decoder2)
    decoder_guidance = agg.decoder_guidance_projection
    return {
        "text_guidance_dim": agg.text_guidance_projection[0].in_features if agg.text_guidance_projection else 0,
        "text_guidance_proj_dim": layer.attention.attention.q.in_features - hidden,
        "appearance_guidance_dim": agg.guidance_projection[0].in_channels if agg.guidance_projection else 0,
        "appearance_guidance_proj_dim": block.attn.q.in_features - hidden,
        "decoder_dims": [up.conv.double_conv[0].out_channels for up in ups],
        "decoder_guidance_dims": [p[0].in_channels for p in decoder_guidance] if decoder_guidance else [0, 0],
        "decoder_guidance_proj_dims": [up.conv.double_conv[0].in_channels - up.up.out_channels for up in ups],
        "num_layers": len(agg.layers),
        "nheads": block.attn.num_heads,
        "hidden_dim": hidden,
        "pooling_size": tuple(layer.attention.test_pool.kernel_size),  # the pooling ours uses in eval mode
        "feature_resolution": tuple(block.resolution),
        "window_size": block.window_size,
        "attention_type": layer.attention.attention.attention_type,
        "prompt_channel": agg.conv1.in_channels,
        "pad_len": agg.pad_length,
    }


def setup(args) -> dict:
    """Builds our model, saves its aggregator, the official arguments and the inputs to `args.setup`."""
    import torch

    torch.manual_seed(0)
    model = build(Path(args.repo).resolve(), args.model, "cpu", args.opts)
    agg = model.sem_seg_head.predictor.transformer
    h, w = agg.layers[0].swin_block.block_1.resolution
    width = model.sem_seg_head.predictor.clip_model.text_projection.shape[-1]
    g = torch.Generator().manual_seed(0)
    guidance_dims = ([agg.guidance_projection[0].in_channels]
                     + [p[0].in_channels for p in agg.decoder_guidance_projection])
    inputs = {
        "img_feats": torch.randn(args.views, width, h, w, generator=g),
        "text": torch.nn.functional.normalize(
            torch.randn(max(args.classes), agg.conv1.in_channels, width, generator=g), dim=-1),
        "guidance": [torch.randn(args.views, d, h * 2**i, w * 2**i, generator=g) for i, d in enumerate(guidance_dims)],
    }
    kwargs = official_kwargs(agg)
    torch.save({"aggregator": agg, "official_kwargs": kwargs, "inputs": inputs}, args.setup)
    return {"official_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}


def worker(args) -> dict:
    """One (model, K, implementation): forward time, peak RSS; writes the logits to `args.output`."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(args.repo).resolve()))
    import importlib.util

    import catseg  # noqa: F401  (both sides import the same modules: equal RSS baselines)
    # The file alone, not the package: importing `cat_seg` would register its datasets under the
    # names catseg registers too. model.py needs only torch, einops and timm.
    path = (Path(args.official) / OFFICIAL_MODULE.replace(".", "/")).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(OFFICIAL_MODULE, path)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)

    saved = torch.load(args.setup, weights_only=False)
    ours, inputs = saved["aggregator"], saved["inputs"]
    text = inputs["text"][: args.classes]
    views = inputs["img_feats"].shape[0]
    if args.impl == "official":
        kwargs = dict(saved["official_kwargs"])
        if "pad_len" not in inspect.signature(official.Aggregator).parameters:
            if kwargs.pop("pad_len"):
                raise SystemExit("this official checkout has no pad_len (v1 only): use the current official code")
        agg = official.Aggregator(**kwargs)
        agg.load_state_dict(ours.state_dict(), strict=True)
        del ours
        text = text.repeat(views, 1, 1, 1)  # as the official predictor does
    else:
        agg = ours
        text = text.unsqueeze(0).expand(views, -1, -1, -1)  # as our predictor does
    agg.eval()
    before = peak_rss_gib()
    warmup = 1 if args.repeats > 1 else 0
    times = []
    with torch.inference_mode():
        for i in range(warmup + args.repeats):
            start = time.perf_counter()
            out = agg(inputs["img_feats"], text, inputs["guidance"])
            if i >= warmup:
                times.append(time.perf_counter() - start)
    peak = peak_rss_gib()
    torch.save(out, args.output)
    return {"seconds": statistics.median(times), "all_seconds": times, "peak_gib": peak, "before_gib": before,
            "shape": list(out.shape), "module": official.__file__ if args.impl == "official" else type(agg).__module__}


def run(args, extra, limit_gib: float = 0) -> dict:
    """This script in a fresh interpreter with `extra` arguments; its last JSON line, or an error."""
    cmd = [sys.executable, __file__, "--repo", args.repo, "--official", args.official, "--threads", str(args.threads),
           "--views", str(args.views), "--repeats", str(args.repeats), *extra, "--opts", *args.opts]
    return run_isolated(cmd, args.repo, limit_gib)


def max_abs_diff(a: Path, b: Path) -> float:
    import torch

    return (torch.load(a) - torch.load(b)).abs().max().item()


def table(rows) -> str:
    lines = ["| model | K | round | implementation | seconds | peak GiB | before forward GiB | max abs diff | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['K']} | {r.get('round', 1)} | {r['impl']} | {r['error']} | | | | |")
            continue
        diff = f"{r['diff']:.2e}" if "diff" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        lines.append(f"| {r['model']} | {r['K']} | {r.get('round', 1)} | {r['impl']} | {r['seconds']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r['before_gib']:.2f} | {diff} | {ratio} |")
    return "\n".join(lines)


def compare(args, model: str, k: int, setup_file: str, tmp: Path, round_: int) -> list:
    """One round: both implementations in their own processes (official first in odd rounds);
    the max abs difference of their logits and the speed ratio go on the row of the one run last."""
    outputs = {impl: tmp / f"out-{model}-{k}-{impl}.pt" for impl in IMPLEMENTATIONS}
    rows = []
    for impl in (IMPLEMENTATIONS if round_ % 2 else IMPLEMENTATIONS[::-1]):
        r = {"model": model, "K": k, "impl": impl, "round": round_,
             **run(args, ["--worker", impl, "--model", model, "--classes", str(k), "--setup", setup_file,
                          "--output", str(outputs[impl])], args.memory_limit_gib)}
        if len(rows) == 1 and all(o.is_file() for o in outputs.values()):
            r["diff"] = max_abs_diff(*outputs.values())
            if "error" not in rows[0] and "error" not in r:
                official, ours = (rows[0], r) if impl == "ours" else (r, rows[0])
                r["ratio"] = official["seconds"] / ours["seconds"]
        print(json.dumps(r), flush=True)
        rows.append(r)
    for o in outputs.values():
        o.unlink(missing_ok=True)
    return rows


def ratios(rows) -> str:
    """Per (model, K): the median speed ratio of the rounds and its range."""
    lines = []
    for key in dict.fromkeys((r["model"], r["K"]) for r in rows):
        found = [r["ratio"] for r in rows if (r["model"], r["K"]) == key and "ratio" in r]
        if found:
            lines.append(f"{key[0]} K = {key[1]}: ours {statistics.median(found):.2f}x faster (median of "
                         f"{len(found)} rounds; {min(found):.2f}x to {max(found):.2f}x)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True, help="root of an official CAT-Seg checkout (contains cat_seg/)")
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                   help="our repository (default: this one)")
    p.add_argument("--models", nargs="+", default=["B", "L"], choices=list(MODELS))
    p.add_argument("--classes", nargs="+", type=int, default=[150])
    p.add_argument("--views", type=int, default=5, help="batch of views (sliding window: 4 crops + 1 global view)")
    p.add_argument("--repeats", type=int, default=1, help="timed forwards (median reported; warm-up when > 1)")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of both implementations (ratio per round)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit-gib", type=float, default=14.0, help="address-space cap per configuration (0: none)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--opts", nargs="*", default=[], help="extra config overrides of our model KEY VALUE ...")
    p.add_argument("--worker", choices=("setup",) + IMPLEMENTATIONS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.repo = str(Path(args.repo).resolve())
    args.official = str(Path(args.official).resolve())
    if args.worker:
        args.impl = args.worker
        if args.worker != "setup":
            args.classes = args.classes[0]
        print(json.dumps(setup(args) if args.worker == "setup" else worker(args)))
        return
    if not (Path(args.official) / OFFICIAL_MODULE.replace(".", "/")).with_suffix(".py").is_file():
        p.error(f"{args.official} has no {OFFICIAL_MODULE.replace('.', '/')}.py: clone "
                "https://github.com/cvlab-kaist/CAT-Seg and pass its root")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            setup_file = str(Path(tmp) / f"setup-{model}.pt")
            classes = [str(k) for k in args.classes]
            prepared = run(args, ["--worker", "setup", "--model", model, "--setup", setup_file, "--classes", *classes])
            if "error" in prepared:
                rows += [{"model": model, "K": k, "impl": "setup", **prepared} for k in args.classes]
                continue
            print(json.dumps({"model": model, **prepared}), flush=True)
            for k in args.classes:
                for round_ in range(1, args.rounds + 1):
                    rows += compare(args, model, k, setup_file, Path(tmp), round_)
    print(table(rows))
    print(ratios(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
