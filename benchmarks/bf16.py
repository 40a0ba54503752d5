"""bf16 inference (TEST.BF16, approximate, off by default) against fp32: accuracy and speed, measured.

Two parts, each in its own subprocess (own import of `--repo`, own peak memory):

1. Real size, random weights (`--models`, `--classes`): each model is built as
   benchmarks/inference.py builds it (torch.manual_seed(0), random CLIP and aggregator, the
   official evaluation protocol: sliding window, POOLING_SIZES [1, 1]), with random unit-norm
   text features (K, P, C) in the predictor's text cache. Two seeded 512x683 images: "noise"
   (uniform random pixels, the image of benchmarks/inference.py) and "shapes" (smooth gradient
   background, textured coloured shapes, occlusions: the generator of the quick-start dataset,
   catseg/data/quickstart.py, at this size). The same model runs each image in fp32 and in bf16
   (the model's `bf16` switch, which is what TEST.BF16 sets): one warm-up each, then
   `--repeats` timed runs, fp32 and bf16 alternating (median reported). Compared on the
   (K, 512, 683) probabilities: max and mean |Δprob|, argmax agreement (% of pixels) and the
   agreement over the pixels whose fp32 top-1 / top-2 probability gap exceeds each of
   `--margins` (with the % of pixels that have such a gap). Random weights give near-tied class
   scores (the median gap is reported: ~1e-3), so the plain argmax agreement understates bf16 on
   a trained model; part 2 is the accuracy that matters.

2. The quick-start model trained by `make demo` (`--quickstart-dir`, default
   output/quickstart of `--repo`: its config.yaml, else configs/quickstart.yaml; its
   model_final.pth, else its last checkpoint) on the quick-start val split (datasets/quickstart
   of `--repo`), evaluated as train_net.py --eval-only evaluates it (detectron2's test loader,
   catseg's evaluator): one model built with TEST.BF16 False, one with TEST.BF16 True, both from
   the same weights. Reports mIoU of each, max / mean |Δprob| and argmax agreement over all val
   pixels, and the seconds of the whole val pass.

Both parts also check that bf16 really runs: the output dtypes of the Linear / Conv2d modules
(bf16 under TEST.BF16, none in fp32; the text tower, which encodes the class names once outside
the autocast region, stays fp32 by design) and that the returned probabilities are fp32.

    python benchmarks/bf16.py                                   # both parts, defaults
    python benchmarks/bf16.py --models CVPR24-B --classes 20 --repeats 1 --skip-quickstart
    python benchmarks/bf16.py --skip-real-size --quickstart-dir /path/to/output/quickstart
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import MODELS, build, peak_rss_gib, run_isolated  # noqa: E402  (sibling benchmark script)

IMAGES = ("noise", "shapes")
PRECISIONS = ("fp32", "bf16")


def synthetic_image(kind: str, height: int = 512, width: int = 683):
    """A seeded (3, height, width) float 0-255 image: "noise" (benchmarks/inference.py's) or "shapes"."""
    import numpy as np
    import torch

    if kind == "noise":
        return torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(0)).float()
    from catseg.data.quickstart import BASE_COLORS, background, paint_object

    rng = np.random.RandomState(0)
    size = max(height, width)
    img = background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    for cls in rng.randint(1, len(BASE_COLORS) + 1, size=8):
        paint_object(img, label, int(cls), rng)
    img = np.clip(np.rint(img[:height, :width]), 0, 255).astype(np.uint8)
    return torch.from_numpy(img).permute(2, 0, 1).float()


class DtypeCheck:
    """Output dtypes of every Linear / Conv2d call of `model` while active (forward hooks): `counts`
    calls per dtype, `names` the modules per dtype."""

    def __init__(self, model):
        import torch

        self.counts, self.names, self.hooks = {}, {}, []  # names: dtype -> module names (first of each)
        self.modules = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}

    def __enter__(self):
        def hook(name):
            def record(module, inputs, output):
                key = str(output.dtype).replace("torch.", "")
                self.counts[key] = self.counts.get(key, 0) + 1
                self.names.setdefault(key, set()).add(name)
            return record
        self.hooks = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def compare(ref, other, margins) -> dict:
    """Statistics of the (K, H, W) probabilities `other` against `ref` (fp32)."""
    import torch

    ref, other = ref.float(), other.float()
    diff = (other - ref).abs()
    agree = ref.argmax(0) == other.argmax(0)
    top2 = ref.topk(2, dim=0).values if ref.shape[0] > 1 else torch.cat([ref, torch.zeros_like(ref)])
    gap = top2[0] - top2[1]
    return {"max_dprob": diff.max().item(), "sum_dprob": diff.sum().item(), "values": diff.numel(),
            "pixels": agree.numel(), "agree": agree.sum().item(), "median_margin": gap.median().item(),
            "confident": {m: (gap > m).sum().item() for m in margins},
            "confident_agree": {m: (agree & (gap > m)).sum().item() for m in margins}}


def summarise(stats) -> dict:
    """Sums the `compare` results of several images into percentages; per margin m: the % of pixels
    whose fp32 top-1 / top-2 gap exceeds m and the argmax agreement over them (None: no such pixel)."""
    total = {k: sum(s[k] for s in stats) for k in ("sum_dprob", "values", "pixels", "agree")}
    margins = {}
    for m in stats[0]["confident"]:
        n, agree = sum(s["confident"][m] for s in stats), sum(s["confident_agree"][m] for s in stats)
        margins[str(m)] = {"pixels_pct": 100 * n / total["pixels"], "agree_pct": 100 * agree / n if n else None}
    return {"max_dprob": max(s["max_dprob"] for s in stats), "mean_dprob": total["sum_dprob"] / total["values"],
            "agree_pct": 100 * total["agree"] / total["pixels"], "margins": margins,
            "median_margin": statistics.median(s["median_margin"] for s in stats)}


def real_size_worker(args) -> dict:
    """One model at one K: fp32 against bf16 on each synthetic image."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(Path(args.repo).resolve(), args.model, "cpu", args.opts)
    assert not model.bf16, "TEST.BF16 must default to False"
    predictor = model.sem_seg_head.predictor
    names = [f"class {i}" for i in range(args.classes)]
    predictor.set_test_classes(names)
    width = predictor.clip_model.text_projection.shape[-1]
    text = torch.randn(args.classes, len(predictor.prompt_templates), width)
    predictor._text_cache[tuple(names)] = torch.nn.functional.normalize(text, dim=-1)
    out = {"weights_rss_gib": peak_rss_gib(), "images": {}}
    for kind in IMAGES:
        batch = [{"image": synthetic_image(kind), "height": 512, "width": 683}]
        probs, seconds, dtypes = {}, {p: [] for p in PRECISIONS}, {}
        with torch.no_grad():
            for precision in PRECISIONS:  # warm-up, dtypes recorded
                model.bf16 = precision == "bf16"
                with DtypeCheck(model) as check:
                    result = model(batch)[0]["sem_seg"]
                dtypes[precision] = {"modules": check.counts, "output": str(result.dtype).replace("torch.", ""),
                                        "float32_modules": sorted(check.names.get("float32", ()))}
            for _ in range(args.repeats):
                for precision in PRECISIONS:
                    model.bf16 = precision == "bf16"
                    start = time.perf_counter()
                    probs[precision] = model(batch)[0]["sem_seg"]
                    seconds[precision].append(time.perf_counter() - start)
        model.bf16 = False
        out["images"][kind] = {**summarise([compare(probs["fp32"], probs["bf16"], args.margins)]),
                               "seconds": {p: statistics.median(s) for p, s in seconds.items()},
                               "all_seconds": seconds, "dtypes": dtypes}
    out["peak_gib"] = peak_rss_gib()
    return out


def quickstart_paths(repo: Path, folder: Path):
    """(config, weights) of the trained quick-start model in `folder`; SystemExit with one line if absent."""
    weights = folder / "model_final.pth"
    if not weights.is_file() and (folder / "last_checkpoint").is_file():
        weights = folder / (folder / "last_checkpoint").read_text().strip()
    if not weights.is_file():
        raise SystemExit(f"error: no trained quick-start model in {folder} (model_final.pth or last_checkpoint): "
                         "run `make demo` first")
    config = folder / "config.yaml"
    return (config if config.is_file() else repo / "configs" / "quickstart.yaml"), weights


def quickstart_worker(args) -> dict:
    """The quick-start model on its val split, TEST.BF16 False and True (cwd: the repository)."""
    import torch
    from detectron2.evaluation import inference_context

    from catseg.config import load_config
    from catseg.data.dataset_classes import resolve_class_lists
    from catseg.engine import CATSegTrainer, prepare_datasets
    from catseg.evaluation import build_evaluator
    from catseg.modeling.build import build_from_checkpoint

    torch.set_num_threads(args.threads)
    config, weights = quickstart_paths(Path(args.repo).resolve(), Path(args.quickstart_dir).resolve())
    models, evaluators = {}, {}
    for precision in PRECISIONS:
        cfg = load_config(str(config), ["MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", "cpu",
                                        "MODEL.SEM_SEG_HEAD.TEXT_CACHE", "False",
                                        "TEST.BF16", str(precision == "bf16"), *args.opts])
        try:
            prepare_datasets(cfg, cfg.DATASETS.TEST)
        except Exception as e:  # DatasetNotFoundError: one line
            raise SystemExit(f"error: {e} (the quick-start dataset: run `make demo` first)") from None
        resolve_class_lists(cfg, train=False)
        cfg.freeze()
        models[precision] = build_from_checkpoint(cfg)
        assert models[precision].bf16 == (precision == "bf16")
    dataset = cfg.DATASETS.TEST[0]
    loader = CATSegTrainer.build_test_loader(cfg, dataset)
    for precision in PRECISIONS:
        evaluators[precision] = build_evaluator(dataset, output_dir=None, distributed=False)
        evaluators[precision].reset()
    stats, seconds, dtypes = [], dict.fromkeys(PRECISIONS, 0.0), {}
    with inference_context(models["fp32"]), inference_context(models["bf16"]), torch.no_grad():
        for i, inputs in enumerate(loader):
            outputs = {}
            for precision in PRECISIONS:
                check = DtypeCheck(models[precision])
                if i == 0:
                    check.__enter__()
                start = time.perf_counter()
                outputs[precision] = models[precision](inputs)
                seconds[precision] += time.perf_counter() - start
                if i == 0:
                    check.__exit__()
                    dtypes[precision] = {"modules": check.counts,
                                         "output": str(outputs[precision][0]["sem_seg"].dtype).replace("torch.", ""),
                                         "float32_modules": sorted(check.names.get("float32", ()))}
                evaluators[precision].process(inputs, outputs[precision])
            for ref, other in zip(outputs["fp32"], outputs["bf16"]):
                stats.append(compare(ref["sem_seg"], other["sem_seg"], args.margins))
    metrics = {p: evaluators[p].evaluate()["sem_seg"] for p in PRECISIONS}
    earlier = Path(args.quickstart_dir) / "eval" / "metrics_eval.json"
    demo_miou = json.loads(earlier.read_text())["sem_seg"]["mIoU"] if earlier.is_file() else None
    return {"config": str(config), "weights": str(weights), "dataset": dataset, "images": len(stats),
            "miou": {p: metrics[p]["mIoU"] for p in PRECISIONS}, "pacc": {p: metrics[p]["pACC"] for p in PRECISIONS},
            "make_demo_miou": demo_miou, "seconds": seconds, "dtypes": dtypes, **summarise(stats)}


def dtype_note(dtypes) -> str:
    """"bf16: 123 of 130 Linear/Conv2d outputs bf16, output float32; fp32: none bf16"."""
    def count(d):
        return d["modules"].get("bfloat16", 0), sum(d["modules"].values())
    b, n = count(dtypes["bf16"])
    f, m = count(dtypes["fp32"])
    rest = dtypes["bf16"]["float32_modules"]
    rest = f" (float32: {', '.join(rest[:4])}{', ...' if len(rest) > 4 else ''})" if rest else ""
    return (f"bf16 pass: {b} of {n} Linear / Conv2d outputs in bfloat16{rest}, probabilities "
            f"{dtypes['bf16']['output']}; fp32 pass: {f} of {m} in bfloat16, probabilities {dtypes['fp32']['output']}")


def margin_cells(s) -> str:
    """"agree % (pixels %)" per margin; "- (0.0)" where no pixel has that margin."""
    return " | ".join(f"{'-' if m['agree_pct'] is None else format(m['agree_pct'], '.2f')} ({m['pixels_pct']:.2f})"
                      for m in s["margins"].values())


def margin_heads(margins) -> str:
    return "".join(f" agree % where fp32 margin > {m:g} (% of pixels) |" for m in margins)


def real_size_table(results, margins) -> str:
    rows = ["| model | K | image | max abs dprob | mean abs dprob | argmax agree % |" + margin_heads(margins)
            + " median fp32 margin | fp32 s | bf16 s | speedup |",
            "|---|---|---|---|---|---|" + "---|" * len(margins) + "---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['K']} | {r['error']} |" + " |" * (len(margins) + 7))
            continue
        for kind, s in r["images"].items():
            sec = s["seconds"]
            rows.append(f"| {r['model']} | {r['K']} | {kind} | {s['max_dprob']:.2e} | {s['mean_dprob']:.2e} | "
                        f"{s['agree_pct']:.2f} | {margin_cells(s)} | {s['median_margin']:.2e} | "
                        f"{sec['fp32']:.2f} | {sec['bf16']:.2f} | {sec['fp32'] / sec['bf16']:.2f}x |")
    return "\n".join(rows)


def quickstart_table(q, margins) -> str:
    demo = f" (make demo's eval: {q['make_demo_miou']:.2f})" if q.get("make_demo_miou") is not None else ""
    return "\n".join([
        f"Quick-start model ({q['weights']}), {q['dataset']}, {q['images']} images{demo}:", "",
        "| precision | mIoU | pACC | val pass s |", "|---|---|---|---|",
        *(f"| {p} | {q['miou'][p]:.2f} | {q['pacc'][p]:.2f} | {q['seconds'][p]:.2f} |" for p in PRECISIONS), "",
        "| max abs dprob | mean abs dprob | argmax agree % |" + margin_heads(margins) + " median fp32 margin |",
        "|---|---|---|" + "---|" * len(margins) + "---|",
        f"| {q['max_dprob']:.2e} | {q['mean_dprob']:.2e} | {q['agree_pct']:.3f} | {margin_cells(q)} | "
        f"{q['median_margin']:.2e} |"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=".", help="the checkout to measure (default .)")
    p.add_argument("--models", nargs="+", default=["CVPR24-B", "CVPR24-L", "B", "L"], choices=list(MODELS))
    p.add_argument("--classes", nargs="+", type=int, default=[150], help="vocabulary sizes K (default 150)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per precision after one warm-up (median)")
    p.add_argument("--margins", nargs="+", type=float, default=[0.001, 0.01],
                   help="argmax agreement is also reported over the pixels whose fp32 top-1 / top-2 gap exceeds each")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit-gib", type=float, default=14.0, help="address-space cap per subprocess (0: none)")
    p.add_argument("--quickstart-dir", help="the trained quick-start model (default REPO/output/quickstart)")
    p.add_argument("--skip-real-size", action="store_true", help="only the quick-start part")
    p.add_argument("--skip-quickstart", action="store_true", help="only the real-size part")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--opts", nargs="*", default=[], help="extra config overrides KEY VALUE ...")
    p.add_argument("--worker", choices=["real-size", "quickstart"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    repo = Path(args.repo).resolve()
    args.quickstart_dir = str(Path(args.quickstart_dir or repo / "output" / "quickstart").resolve())
    if args.worker == "real-size":
        args.classes = args.classes[0]
        print(json.dumps(real_size_worker(args)))
        return
    if args.worker == "quickstart":
        print(json.dumps(quickstart_worker(args)))
        return
    if not args.skip_quickstart:
        quickstart_paths(repo, Path(args.quickstart_dir))  # fail early, one line
    common = ["--repo", str(repo), "--repeats", str(args.repeats), "--margins", *map(str, args.margins),
              "--threads", str(args.threads), "--quickstart-dir", args.quickstart_dir, "--opts", *args.opts]
    results, quickstart = [], None
    if not args.skip_real_size:
        for model in args.models:
            for k in args.classes:
                cmd = [sys.executable, __file__, "--worker", "real-size", "--model", model, "--classes", str(k),
                       *common]
                r = {"model": model, "K": k, **run_isolated(cmd, str(repo), args.memory_limit_gib)}
                print(json.dumps(r), flush=True)
                results.append(r)
    if not args.skip_quickstart:
        quickstart = run_isolated([sys.executable, __file__, "--worker", "quickstart", *common], str(repo))
        print(json.dumps(quickstart), flush=True)
    if results:
        print("\nReal size, random weights (seeded), sliding window, one 512x683 image each:\n")
        print(real_size_table(results, args.margins))
        for r in results:
            if "images" in r:
                print(f"- {r['model']} K={r['K']}: {dtype_note(r['images']['noise']['dtypes'])}; "
                      f"peak {r['peak_gib']:.2f} GiB")
    if quickstart:
        if "error" in quickstart:
            print(f"\nquick-start: {quickstart['error']}")
        else:
            print("\n" + quickstart_table(quickstart, args.margins))
            print(f"- {dtype_note(quickstart['dtypes'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"real_size": results, "quickstart": quickstart}, indent=1))


if __name__ == "__main__":
    main()
