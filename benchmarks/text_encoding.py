"""Text-encoding speed: full 77-token CLIP encoding vs EOT-bounded, length-sorted encoding,
and the disk cache's hit time, with a real-size text tower (random weights, no download).

    .venv/bin/python benchmarks/text_encoding.py                      # ADE-150 x 80, ViT-B/16
    .venv/bin/python benchmarks/text_encoding.py --class-stride 10    # 15 of the 150 classes
    .venv/bin/python benchmarks/text_encoding.py --rows-per-batch 16  # sampled: see below

Both encodings see the same length-sorted batches of --batch-size texts. With
--rows-per-batch r > 0 only the first r texts of each batch are encoded (same padded length
as the whole batch) and each batch's time is scaled by batch size / r: the totals are then
estimates, the equality check covers the sampled texts only. 0 encodes everything.
The cache part writes an entry for --cache-classes under the real key (the embeddings stored are
the model's own for a few classes tiled to shape: the hit path does not look at values) and
times a hit with the fingerprint memo cleared, as a second process would.
"""
import argparse
import tempfile
import time

import open_clip
import torch

from catseg.data.class_names import load_class_names, synonyms
from catseg.modeling import text
from catseg.modeling.clip_encoder import DenseCLIPEncoder
from catseg.modeling.text import encode_text_bounded, eot_positions


def texts_of(names, templates):
    """Texts in text.class_embeddings' order (class, template, synonym)."""
    return [t.format(s) for name in names for t in templates for s in synonyms(name)]


@torch.inference_mode()
def bench_encoding(model, tokenizer, names, templates, batch_size, rows_per_batch):
    tokens = tokenizer(texts_of(names, templates))
    lengths = eot_positions(model, tokens) + 1
    order = lengths.argsort(descending=True)
    full_s = bounded_s = 0.0
    max_diff = 0.0
    bounded_tokens = 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[order[start:start + batch_size]]
        bounded_tokens += len(batch) * int(lengths[order[start]])
        rows = batch[:rows_per_batch] if rows_per_batch else batch
        scale = len(batch) / len(rows)
        t0 = time.perf_counter()
        ref = open_clip.CLIP.encode_text(model, rows)  # open_clip's own, full 77 tokens
        t1 = time.perf_counter()
        ours = encode_text_bounded(model, rows)
        t2 = time.perf_counter()
        full_s += (t1 - t0) * scale
        bounded_s += (t2 - t1) * scale
        max_diff = max(max_diff, (torch.nn.functional.normalize(ref, dim=-1)
                                  - torch.nn.functional.normalize(ours, dim=-1)).abs().max().item())
    return {"texts": len(tokens), "mean_length": lengths.float().mean().item(), "max_length": int(lengths.max()),
            "full_s": full_s, "bounded_s": bounded_s, "speedup": full_s / bounded_s,
            "token_ratio": len(tokens) * tokens.shape[1] / bounded_tokens, "max_abs_diff_normalised": max_diff}


@torch.inference_mode()
def bench_cache_hit(model, tokenizer, names, templates):
    with tempfile.TemporaryDirectory() as tmp:
        encoder = text.CachedTextEncoder(cache_dir=tmp)
        t0 = time.perf_counter()
        key = text.cache_key(model, tokenizer, names, templates, encoder.config)
        fingerprint_s = time.perf_counter() - t0
        few = text.class_embeddings(model, tokenizer, names[:2], templates)
        placeholder = few.repeat(len(names) // 2 + 1, 1, 1)[:len(names)]
        encoder.cache.save(key, placeholder, [])
        size_mb = encoder.cache.path(key).stat().st_size / 2**20
        hits = []
        for _ in range(3):
            text._fingerprints.clear()  # a second process starts without the memo
            t0 = time.perf_counter()
            out = encoder(model, tokenizer, names, templates)
            hits.append(time.perf_counter() - t0)
            assert encoder.last_hit and out.shape == placeholder.shape
    return {"classes": len(names), "fingerprint_s": fingerprint_s, "hit_s": hits, "file_mb": size_mb}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16-quickgelu")
    parser.add_argument("--classes", default="ade150")
    parser.add_argument("--templates", default="imagenet")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rows-per-batch", type=int, default=0)
    parser.add_argument("--class-stride", type=int, default=1, help="use every n-th class (a smaller, same-kind set)")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--skip-encoding", action="store_true")
    parser.add_argument("--cache-classes", default="ade847")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = DenseCLIPEncoder(open_clip.create_model(args.arch, pretrained=None)).float().eval().to(args.device)
    tokenizer = open_clip.get_tokenizer(args.arch)
    templates = text.prompt_templates(args.templates)
    print(f"{args.arch} (random weights) on {args.device}, {torch.get_num_threads()} threads")
    if not args.skip_encoding:
        report_encoding(args, model, tokenizer, templates)
    if not args.skip_cache:
        hit = bench_cache_hit(model, tokenizer, load_class_names(args.cache_classes), templates)
        print(f"cache hit {args.cache_classes} x {len(templates)} (3 runs, fingerprint recomputed each): "
              f"{', '.join(f'{s:.2f}' for s in hit['hit_s'])} s (first fingerprint alone "
              f"{hit['fingerprint_s']:.2f} s, file {hit['file_mb']:.0f} MiB)")


def report_encoding(args, model, tokenizer, templates):
    names = load_class_names(args.classes)[::args.class_stride]
    enc = bench_encoding(model, tokenizer, names, templates, args.batch_size, args.rows_per_batch)
    sampled = f", sampled {args.rows_per_batch} rows/batch (times scaled)" if args.rows_per_batch else ""
    subset = f" (every {args.class_stride}th class: {len(names)})" if args.class_stride > 1 else ""
    print(f"{args.classes}{subset} x {len(templates)} templates: {enc['texts']} texts, EOT length mean "
          f"{enc['mean_length']:.1f} max {enc['max_length']}{sampled}")
    print(f"  full 77-token : {enc['full_s']:.1f} s")
    print(f"  EOT-bounded   : {enc['bounded_s']:.1f} s   speedup x{enc['speedup']:.2f} "
          f"(padded-token ratio x{enc['token_ratio']:.2f})")
    print(f"  max |difference| of normalised features: {enc['max_abs_diff_normalised']:.2e}")

if __name__ == "__main__":
    main()
