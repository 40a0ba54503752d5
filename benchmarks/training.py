"""Training-step speed / memory of CAT-Seg (B, L, CVPR'24 B and L), and the official aggregator beside ours.

Protocol (defaults): K = 171 classes (COCO-Stuff training), a batch of 2 random 384x384 images
with random labels (10% ignored) on CPU, 2 threads; random weights at the real sizes, built
from our own config files (benchmarks/inference.py `MODELS`) with the training pooling; the
optimizer and its parameter groups are the trainer's (`catseg.engine.solver.build_optimizer`).
The v1 text tower is frozen, so its text features come from the cache (random, unit-norm);
the CVPR'24 text tower trains, so its text encoding runs, with gradients, in every step.

Every configuration runs in its own process (own peak RSS: ru_maxrss, weights included; on
CUDA max allocated), one untimed warm-up step and `--repeats` timed steps (median).

- `step`: forward (loss), backward, optimizer, and the aggregator's parts, forward and
  backward: the cost volume embedding (conv1), the spatial and the class aggregation (summed
  over layers), the decoder (both upsampling stages and the head). A part's backward is the
  time from the gradient reaching its output to the gradient reaching its input (tensor hooks),
  so "agg other" (guidance projections, text guidance, slicing) is the aggregator's total
  minus its parts. Variants: `ours`, `ours+ckpt` (MODEL.SEM_SEG_HEAD.CHECKPOINT_ACTIVATIONS,
  with MEMORY_BUDGET_MB 256: recomputed chunks of about a quarter GB),
  and `official`: the same pipeline with the official `Aggregator` in place of ours (same
  weights), so the step differs only by the aggregator.
- `aggregator`: the aggregator alone, forward + backward of a fixed random cotangent, same
  weights and inputs on both sides (dense CLIP features, text features as each side's
  predictor passes them, guidance maps); the parent reports the max abs difference of every
  gradient (parameters and inputs) against the official one. In float32 these differences are
  rounding amplified by random weights (GroupNorm / LayerNorm backward passes cancel large
  terms); a float64 run of both at `--float64-classes` classes shows the two computations agree.

With `ours+ckpt`, the parts' forward seconds also count the recomputation in the backward pass.

The official code is NOT part of this repository. Pass the root of a checkout (the directory
with `cat_seg/`), as for benchmarks/official_aggregator.py; without --official only our side runs:

    python benchmarks/training.py --official /tmp/CAT-Seg --models B L CVPR24-B CVPR24-L
"""
import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import MODELS, peak_rss_gib, run_isolated  # noqa: E402  (sibling benchmark scripts)
from official_aggregator import OFFICIAL_MODULE, official_kwargs  # noqa: E402

PARTS = ("cost", "spatial", "class", "decoder")
VARIANTS = {"step": ("official", "ours", "ours+ckpt"), "aggregator": ("official", "ours", "ours+ckpt")}


def build_training(repo: Path, model: str, device: str, opts):
    """(cfg, model in training mode) of `repo`'s config for `model`, random weights."""
    sys.path.insert(0, str(repo))
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from catseg import add_catseg_config

    cfg = get_cfg()
    add_catseg_config(cfg)
    cfg.merge_from_file(str(repo / "configs" / MODELS[model]))
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "random", "MODEL.DEVICE", device, *opts])
    return cfg, build_model(cfg).train()


class PartTimer:
    """Forward and backward seconds per aggregator part, from module hooks and tensor hooks."""

    def __init__(self, device: str):
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.reset()

    def reset(self):
        self.forward = dict.fromkeys(PARTS, 0.0)
        self.backward = dict.fromkeys(PARTS, 0.0)

    def attach(self, part: str, module):
        import torch

        starts, grads = [], []

        def pre(_, args):
            self.sync()
            starts.append(time.perf_counter())
            x = args[0]
            x = x if torch.is_tensor(x) else x.y  # a lean decoder's PreActivation
            if torch.is_tensor(x) and x.requires_grad:  # the gradient reaching the input ends its backward
                x.register_hook(lambda g: self._end_backward(part, grads))

        def post(_, args, out):
            self.sync()
            self.forward[part] += time.perf_counter() - starts.pop()
            out = out if torch.is_tensor(out) else out.y  # a lean decoder's PreActivation
            if out.requires_grad:
                out.register_hook(lambda g: grads.append(time.perf_counter()))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post, with_kwargs=False)

    def _end_backward(self, part, grads):
        if grads:
            self.backward[part] += time.perf_counter() - grads.pop()


def attach_parts(agg, timer: PartTimer) -> None:
    """Hooks the parts of our or the official aggregator (same module names)."""
    timer.attach("cost", agg.conv1)
    for layer in agg.layers:
        timer.attach("spatial", layer.swin_block)
        timer.attach("class", layer.attention)
    for module in (agg.decoder1, agg.decoder2):  # the head conv counts in "agg other"
        timer.attach("decoder", module)


def official_aggregator(official_root: str, ours):
    """The official `Aggregator` with our aggregator's arguments (training pooling) and weights."""
    import importlib

    sys.path.insert(0, official_root)
    official = importlib.import_module(OFFICIAL_MODULE)
    kwargs = official_kwargs(ours)
    kwargs["pooling_size"] = tuple(ours.layers[0].attention.pool.kernel_size)  # training pooling
    if "pad_len" not in inspect.signature(official.Aggregator).parameters and kwargs.pop("pad_len"):
        raise SystemExit("this official checkout has no pad_len (v1 only): use the current official code")
    agg = official.Aggregator(**kwargs).to(ours.conv1.weight.device)
    agg.load_state_dict(ours.state_dict(), strict=True)
    return agg.train()


# the smallest-memory setting: checkpointing, and a quarter of the default chunk budget
CHECKPOINT_OPTS = ["MODEL.SEM_SEG_HEAD.CHECKPOINT_ACTIVATIONS", "True", "MODEL.SEM_SEG_HEAD.MEMORY_BUDGET_MB", "256"]


def variant_opts(variant: str):
    return CHECKPOINT_OPTS if variant == "ours+ckpt" else []


def step_worker(args) -> dict:
    """Training steps of one (model, variant)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repo = Path(args.repo).resolve()
    cfg, model = build_training(repo, args.model, args.device, list(args.opts) + variant_opts(args.variant))
    from catseg.engine.solver import build_optimizer

    predictor = model.sem_seg_head.predictor
    names = [f"class {i}" for i in range(args.classes)]
    predictor.train_class_names = names
    if not predictor.clip_model.text_trainable:  # frozen text tower: features come from the cache
        width = predictor.clip_model.text_projection.shape[-1]
        text = torch.randn(args.classes, len(predictor.prompt_templates), width, device=args.device)
        predictor._text_cache[tuple(names)] = torch.nn.functional.normalize(text, dim=-1)
    if args.variant == "official":
        predictor.transformer = official_aggregator(args.official, predictor.transformer)
    optimizer = build_optimizer(cfg, model)
    g = torch.Generator().manual_seed(0)
    size = args.size
    batch = []
    for _ in range(args.batch):
        label = torch.randint(0, args.classes, (size, size), generator=g)
        label[torch.rand(size, size, generator=g) < 0.1] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        batch.append({"image": torch.randint(0, 256, (3, size, size), generator=g).float(), "sem_seg": label})
    timer = PartTimer(args.device)
    attach_parts(predictor.transformer, timer)
    sync = timer.sync
    weights_gib = peak_rss_gib()
    rows = []
    for i in range(1 + args.repeats):
        timer.reset()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        loss = model(batch)["loss_sem_seg"]
        sync()
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        sync()
        t3 = time.perf_counter()
        if i:
            rows.append({"seconds": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                         "parts_forward": dict(timer.forward), "parts_backward": dict(timer.backward),
                         "loss": loss.item()})
    median = sorted(rows, key=lambda r: r["seconds"])[len(rows) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else peak_rss_gib()
    return {**median, "all_seconds": [r["seconds"] for r in rows], "peak_gib": peak, "weights_gib": weights_gib}


def aggregator_worker(args) -> dict:
    """Forward + backward of one aggregator; writes every gradient to `args.output`."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repo = Path(args.repo).resolve()
    _, model = build_training(repo, args.model, args.device, list(args.opts) + variant_opts(args.variant))
    agg = model.sem_seg_head.predictor.transformer
    del model
    h, w = agg.layers[0].swin_block.block_1.resolution
    if args.variant == "official":
        agg = official_aggregator(args.official, agg)
    width = agg.text_guidance_projection[0].in_features if agg.text_guidance_projection else 512
    g = torch.Generator().manual_seed(0)
    dims = [agg.guidance_projection[0].in_channels] + [p[0].in_channels for p in agg.decoder_guidance_projection]
    views = args.batch
    img = torch.randn(views, width, h, w, generator=g).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(args.classes, agg.conv1.in_channels, width, generator=g), dim=-1)
    text.requires_grad_()
    guidance = [torch.randn(views, d, h * 2**i, w * 2**i, generator=g).requires_grad_() for i, d in enumerate(dims)]
    cotangent = torch.randn(views, args.classes, 4 * h, 4 * w, generator=g)
    # each side gets the text as its own predictor passes it: official repeat, ours expand
    batched = (lambda: text.repeat(views, 1, 1, 1)) if args.variant == "official" else (
        lambda: text.unsqueeze(0).expand(views, -1, -1, -1))
    timer = PartTimer(args.device)
    attach_parts(agg, timer)
    before = peak_rss_gib()
    rows = []
    for i in range(1 + args.repeats):
        timer.reset()
        for t in [img, text, *guidance, *agg.parameters()]:
            t.grad = None
        t0 = time.perf_counter()
        out = agg(img, batched(), guidance)
        t1 = time.perf_counter()
        out.backward(cotangent)
        t2 = time.perf_counter()
        if i:
            rows.append({"seconds": t2 - t0, "forward": t1 - t0, "backward": t2 - t1,
                         "parts_forward": dict(timer.forward), "parts_backward": dict(timer.backward)})
    grads = {name: p.grad for name, p in agg.named_parameters() if p.grad is not None}
    grads.update({"input.img_feats": img.grad, "input.text": text.grad,
                  **{f"input.guidance{i}": x.grad for i, x in enumerate(guidance)}})
    torch.save(grads, args.output)
    median = sorted(rows, key=lambda r: r["seconds"])[len(rows) // 2]
    return {**median, "all_seconds": [r["seconds"] for r in rows], "peak_gib": peak_rss_gib(), "before_gib": before}


def shift_invariant(name: str) -> bool:
    """The spatial (softmax) attention's key biases: exactly zero gradient in exact arithmetic,
    since softmax ignores a shift shared by all keys; both sides hold rounding noise there."""
    return ".swin_block." in name and name.endswith("attn.k.bias")


def float64_worker(args) -> dict:
    """Both aggregators in float64 in this process, same weights and inputs, `args.classes`
    classes: output and per-gradient differences, relative to each gradient's largest element;
    the `shift_invariant` key biases are reported apart."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, model = build_training(Path(args.repo).resolve(), args.model, args.device, list(args.opts))
    ours = model.sem_seg_head.predictor.transformer.double()
    del model
    h, w = ours.layers[0].swin_block.block_1.resolution
    official = official_aggregator(args.official, ours).double()
    width = ours.text_guidance_projection[0].in_features if ours.text_guidance_projection else 512
    dims = [ours.guidance_projection[0].in_channels] + [p[0].in_channels for p in ours.decoder_guidance_projection]
    g = torch.Generator().manual_seed(0)
    views = args.batch
    img = torch.randn(views, width, h, w, generator=g, dtype=torch.float64)
    text = torch.nn.functional.normalize(
        torch.randn(args.classes, ours.conv1.in_channels, width, generator=g, dtype=torch.float64), dim=-1)
    guidance = [torch.randn(views, d, h * 2**i, w * 2**i, generator=g, dtype=torch.float64) for i, d in enumerate(dims)]
    cotangent = torch.randn(views, args.classes, 4 * h, 4 * w, generator=g, dtype=torch.float64)
    results = []
    for agg, batched in [(official, text.repeat(views, 1, 1, 1)), (ours, text.unsqueeze(0).expand(views, -1, -1, -1))]:
        inputs = [img.clone().requires_grad_(), *[x.clone().requires_grad_() for x in guidance]]
        out = agg(inputs[0], batched, inputs[1:])
        out.backward(cotangent)
        grads = {n: p.grad for n, p in agg.named_parameters() if p.grad is not None}
        grads.update({f"input.{i}": x.grad for i, x in enumerate(inputs)})
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    relative = {k: ((grads_a[k] - grads_b[k]).abs().max() / grads_a[k].abs().max()).item() for k in grads_a}
    invariant = {k for k in relative if shift_invariant(k)}
    rest = {k: v for k, v in relative.items() if k not in invariant}
    worst = max(rest, key=rest.get)
    return {"classes": args.classes, "output_rel": ((out_a - out_b).abs().max() / out_a.abs().max()).item(),
            "grad_rel": rest[worst], "grad_rel_name": worst, "gradients": len(rest), "key_biases": len(invariant),
            "key_bias_abs": max((grads_a[k] - grads_b[k]).abs().max().item() for k in invariant),
            "key_bias_max": max(grads_a[k].abs().max().item() for k in invariant)}


def gradient_difference(official: Path, ours: Path) -> dict:
    """Max abs difference over all gradients and the largest one for scale; per gradient, the
    max abs difference relative to that gradient's largest element: the worst one and its name
    (leaving out the `shift_invariant` ones, rounding noise on both sides)."""
    import torch

    a, b = torch.load(official), torch.load(ours)
    if set(a) != set(b):
        return {"grad_diff": float("nan"), "grad_keys_differ": sorted(set(a) ^ set(b))}
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    relative = {k: diffs[k] / max(a[k].abs().max().item(), 1e-30) for k in a if not shift_invariant(k)}
    worst = max(relative, key=relative.get)
    return {"grad_diff": max(diffs.values()), "grad_max": max(a[k].abs().max().item() for k in a),
            "grad_rel": relative[worst], "grad_rel_name": worst}


def run(args, scope: str, model: str, variant: str, output: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", scope, "--variant", variant, "--model", model,
           "--repo", args.repo, "--official", args.official or "", "--classes", str(args.classes),
           "--batch", str(args.batch), "--size", str(args.size), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--device", args.device, "--output", output, "--opts", *args.opts]
    return run_isolated(cmd, args.repo, args.memory_limit_gib if args.device == "cpu" else 0)


def fmt_parts(r, key):
    return " | ".join(f"{r[key][p]:.2f}" for p in PARTS)


def against_official(rows):
    """Per row: (official row of its model or None, speed ratio text, memory ratio text)."""
    ref = {r["model"]: r for r in rows if r["variant"] == "official" and "seconds" in r}
    for r in rows:
        o = ref.get(r["model"]) if "seconds" in r else None
        yield (r, (f"{o['seconds'] / r['seconds']:.2f}x" if o else "-"),
               (f"{r['peak_gib'] / o['peak_gib']:.2f}" if o else "-"))


def step_table(rows) -> str:
    lines = ["| model | variant | s / step | forward | backward | optimizer | peak GiB | "
             + " | ".join(f"{p} fwd" for p in PARTS) + " | " + " | ".join(f"{p} bwd" for p in PARTS)
             + " | speed vs official | memory vs official |",
             "|---|---|---|---|---|---|---|" + "---|" * (2 * len(PARTS)) + "---|---|"]
    for r, speed, memory in against_official(rows):
        if "seconds" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['error']} |" + " |" * (6 + 2 * len(PARTS)))
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {r['seconds']:.2f} | {r['forward']:.2f} | "
                     f"{r['backward']:.2f} | {r['optimizer']:.2f} | {r['peak_gib']:.2f} | "
                     f"{fmt_parts(r, 'parts_forward')} | {fmt_parts(r, 'parts_backward')} | {speed} | {memory} |")
    return "\n".join(lines)


def aggregator_table(rows) -> str:
    lines = ["| model | variant | s (fwd + bwd) | forward | backward | peak GiB | before GiB | "
             + " | ".join(f"{p} fwd / bwd" for p in PARTS) + " | max grad diff (max grad); worst relative | "
             "speed vs official | memory vs official |",
             "|---|---|---|---|---|---|---|" + "---|" * len(PARTS) + "---|---|---|"]
    for r, speed, memory in against_official(rows):
        if "seconds" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['error']} |" + " |" * (6 + len(PARTS)))
            continue
        diff = (f"{r['grad_diff']:.1e} ({r['grad_max']:.1e}); relative {r['grad_rel']:.1e}"
                if "grad_diff" in r else "-")
        parts = " | ".join(f"{r['parts_forward'][p]:.2f} / {r['parts_backward'][p]:.2f}" for p in PARTS)
        lines.append(f"| {r['model']} | {r['variant']} | {r['seconds']:.2f} | {r['forward']:.2f} | "
                     f"{r['backward']:.2f} | {r['peak_gib']:.2f} | {r['before_gib']:.2f} | {parts} | {diff} | "
                     f"{speed} | {memory} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", default="", help="root of an official CAT-Seg checkout (contains cat_seg/)")
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                   help="our repository (default: this one)")
    p.add_argument("--models", nargs="+", default=["B", "L", "CVPR24-B", "CVPR24-L"], choices=list(MODELS))
    p.add_argument("--scopes", nargs="+", default=["aggregator", "step", "float64"], choices=[*VARIANTS, "float64"],
                   help="float64: the gradient check, with --official")
    p.add_argument("--variants", nargs="+", default=["official", "ours", "ours+ckpt"],
                   choices=["official", "ours", "ours+ckpt"])
    p.add_argument("--classes", type=int, default=171)
    p.add_argument("--batch", type=int, default=0, help="images per step (0: 2 on CPU, 1 on CUDA: the official "
                                                        "4 images on 4 GPUs)")
    p.add_argument("--size", type=int, default=384, help="training crop")
    p.add_argument("--repeats", type=int, default=1, help="timed steps after one warm-up step (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--memory-limit-gib", type=float, default=22.0,
                   help="address-space cap per CPU configuration (0: none)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--opts", nargs="*", default=[], help="extra config overrides of our model KEY VALUE ...")
    p.add_argument("--float64-classes", type=int, default=24, help="classes of the float64 gradient check")
    p.add_argument("--worker", choices=[*VARIANTS, "float64"], help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.repo = str(Path(args.repo).resolve())
    args.batch = args.batch or (2 if args.device == "cpu" else 1)
    if args.worker:
        workers = {"step": step_worker, "aggregator": aggregator_worker, "float64": float64_worker}
        print(json.dumps(workers[args.worker](args)))
        return
    if args.official:
        args.official = str(Path(args.official).resolve())
        if not (Path(args.official) / OFFICIAL_MODULE.replace(".", "/")).with_suffix(".py").is_file():
            p.error(f"{args.official} has no {OFFICIAL_MODULE.replace('.', '/')}.py: clone "
                    "https://github.com/cvlab-kaist/CAT-Seg and pass its root")
    variants = [v for v in args.variants if v != "official" or args.official]
    results = {scope: [] for scope in args.scopes if scope in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for scope in results:
            for model in args.models:
                grads = {v: str(Path(tmp) / f"grads-{model}-{v}.pt") for v in variants}
                for v in variants:
                    r = {"model": model, "variant": v, **run(args, scope, model, v, grads[v])}
                    if (scope == "aggregator" and v != "official" and "seconds" in r
                            and Path(grads.get("official", "")).is_file()):
                        r.update(gradient_difference(Path(grads["official"]), Path(grads[v])))
                    print(json.dumps({"scope": scope, **r}), flush=True)
                    results[scope].append(r)
    if "aggregator" in results:
        print(f"\nAggregator alone, forward + backward (K = {args.classes}, {args.batch} views):\n")
        print(aggregator_table(results["aggregator"]))
    if "step" in results:
        print(f"\nTraining step (K = {args.classes}, batch {args.batch} at {args.size}x{args.size}):\n")
        print(step_table(results["step"]))
    if args.official and "float64" in args.scopes:
        results["float64"] = []
        print(f"\nAggregator gradients in float64, official against ours (K = {args.float64_classes}):\n")
        for model in args.models:
            saved = args.classes
            args.classes = args.float64_classes
            r = {"model": model, **run(args, "float64", model, "ours")}
            args.classes = saved
            results["float64"].append(r)
            if "error" in r:
                print(f"- {model}: {r['error']}")
                continue
            print(f"- {model}: output {r['output_rel']:.1e}, worst of {r['gradients']} gradients "
                  f"{r['grad_rel']:.1e} ({r['grad_rel_name']}), relative to each gradient's largest element; "
                  f"the {r['key_biases']} spatial key biases (exactly zero in exact arithmetic): "
                  f"|difference| {r['key_bias_abs']:.1e}, "
                  f"|gradient| {r['key_bias_max']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
