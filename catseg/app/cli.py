"""`catseg-demo` (and demo/demo.py): segment image files with your own class names.

    catseg-demo --config-file configs/vitl_swinb_384.yaml --opts MODEL.WEIGHTS model.pth \\
        --input photos/ "more/*.jpg" --output out/ --vocab "cat, kitten; sofa; floor"
    catseg-demo --model cvpr24-large --input photo.jpg --output out/ --vocab "cat; sofa"

`--model NAME` picks a released model's config and weights (downloaded on first use; the table:
`--list-models`, catseg/weights/models.py); `--config-file` or `--opts MODEL.WEIGHTS ...` still
override them. MODEL.WEIGHTS may be an `hf://` name or a huggingface.co link (catseg/weights/hub.py).

Inputs: files, folders (their image files, not recursive) and glob patterns. `--refine sam`
labels Segment Anything's automatic masks with CAT-Seg (catseg/app/sam_refine.py; SAM weights from
`--sam-weights` or MODEL.SAM.WEIGHTS). Vocabulary: one of
--vocab "a, b; c" (";" separates classes, "," lists synonyms of one class), --vocab-file
(.json list or .txt with one class per line) or --dataset-vocab (a shipped list: ade150,
ade847, coco, pc59, pc459, voc20, voc20b); none: the config's TEST_CLASS_JSON.

For an input `photo.jpg` it writes `photo_overlay.png`, `photo_labels.png` and `photo.json`
into --output (files and JSON schema: catseg/app/outputs.py). Two inputs with the same stem get
`photo_2...` and so on.

Prints a one-line summary per image and a progress bar. A file that cannot be read is reported
and skipped. Exit code: 0 when every input was processed, 1 when any failed (or an input
matched nothing), 2 for usage and start-up errors (bad arguments, empty vocabulary, missing
config file or weights, unknown config key, unwritable output, a disk that fills up): one
`error: ...` line, no traceback (`--debug` or CATSEG_DEBUG=1 shows it).
"""
import argparse
import glob
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from tqdm import tqdm

from ..config import shipped_config
from ..console import run_command
from ..errors import OutputError, report_errors
from ..image_io import IMAGE_EXTENSIONS, ImageReadError
from ..weights.models import format_model_table, released_model
from .output_dir import make_output_dir
from .outputs import output_stems, summary_line, write_outputs
from .predictor import OpenVocabPredictor
from .vocabulary import EmptyVocabularyError, parse_vocabulary, read_vocabulary_file

DEFAULT_CONFIG = "tiny.yaml"  # a shipped config (random weights)
RANDOM_WEIGHTS_BANNER = """\
############################################################################
#  No --config-file given: using {config}
#  with RANDOM weights. The masks below are meaningless; they only show the
#  pipeline works. Pass --config-file and MODEL.WEIGHTS for real results.
############################################################################"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="catseg-demo", description="Open-vocabulary segmentation of image files.",
                                epilog="Output files and JSON schema: see catseg/app/outputs.py or demo/README.md.")
    p.add_argument("--config-file", default="", help=f"model config (default {DEFAULT_CONFIG}, random weights)")
    p.add_argument("--model", default="", metavar="NAME",
                   help="a released model: its config and weights (--list-models)")
    p.add_argument("--list-models", action="store_true", help="print the released models and exit")
    p.add_argument("--input", nargs="+", help="image files, folders or glob patterns (required)")
    p.add_argument("--output", help="output folder (created; required)")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--vocab", help='class names: "cat, kitten; sky" (";" classes, "," synonyms)')
    vocab.add_argument("--vocab-file", help="class names: .json list or .txt (one class per line)")
    vocab.add_argument("--dataset-vocab", help="a benchmark's class list (ade150, ade847, coco, pc59, ...)")
    p.add_argument("--batch-size", type=int, default=2, help="images per network pass")
    p.add_argument("--bf16", action="store_true",
                   help="run the network in bfloat16 (TEST.BF16): faster, approximate; measured in "
                   "benchmarks/RESULTS.md")
    p.add_argument("--refine", choices=["sam"], help="sam: label Segment Anything's automatic masks with CAT-Seg")
    p.add_argument("--sam-weights", help="local SAM checkpoint for --refine sam (config key MODEL.SAM.WEIGHTS)")
    p.add_argument("--debug", action="store_true", help="show the traceback of start-up errors (or CATSEG_DEBUG=1)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p


def expand_inputs(specs: Sequence[str]) -> Tuple[List[Path], List[str]]:
    """Files for the --input entries, in order without repeats, and the entries matching nothing.

    A folder gives its files with an image extension (sorted); a glob gives its matches
    (files only); an existing file is taken whatever its extension.
    """
    files, unmatched = [], []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found = [path]
        else:
            found = glob_files(spec)
        if not found:
            unmatched.append(spec)
        files.extend(found)
    return list(dict.fromkeys(files)), unmatched


def glob_files(spec: str) -> List[Path]:
    """The files matching glob pattern `spec`, sorted. pathlib's glob: `**` does not descend
    into symlinked folders, so a symlink loop cannot make it hang (glob.glob's does)."""
    parts = Path(spec).parts
    first = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    if first == len(parts):
        return []
    root = Path(*parts[:first]) if first else Path(".")
    return sorted(p for p in root.glob(str(Path(*parts[first:]))) if p.is_file())


def choose_vocabulary(args) -> Optional[List[str]]:
    if args.vocab is not None:
        return parse_vocabulary(args.vocab)
    spec = args.vocab_file or args.dataset_vocab
    return read_vocabulary_file(spec) if spec else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_models:
        print(report_errors(format_model_table, debug=args.debug))
        return 0
    if not args.input or not args.output:
        parser.error("the following arguments are required: --input, --output")
    return run_command(lambda: run(args), debug=args.debug)


def run(args) -> int:
    """The demo on parsed arguments (see the module docstring); returns the exit code."""
    try:
        vocabulary = choose_vocabulary(args)
    except (EmptyVocabularyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = released_model(args.model) if args.model else None
    config = args.config_file or (model.config_path() if model else str(shipped_config(DEFAULT_CONFIG)))
    if not args.config_file and not model:
        print(RANDOM_WEIGHTS_BANNER.format(config=config), file=sys.stderr)
    files, unmatched = expand_inputs(args.input)
    for spec in unmatched:
        print(f"FAILED {spec}: no file or folder matches", file=sys.stderr)
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 1
    out_dir = make_output_dir(args.output)

    opts = (["MODEL.WEIGHTS", model.weights] if model else []) + (["TEST.BF16", "True"] if args.bf16 else [])
    opts += args.opts
    opts += ["MODEL.SAM.WEIGHTS", args.sam_weights] if args.sam_weights else []
    predictor = OpenVocabPredictor(config, opts=opts, batch_size=args.batch_size, refine=args.refine or "",
                                   output="labels")  # the label map only: no (T, H, W) probabilities
    weights = predictor.cfg.MODEL.WEIGHTS
    if (args.config_file or model) and not weights:
        print("WARNING: MODEL.WEIGHTS is empty: the CAT-Seg head has random weights", file=sys.stderr)
    classes = predictor.set_vocabulary(vocabulary if vocabulary is not None else predictor.classes)
    encoder = predictor.head.text_encoder
    cache = {True: ", disk cache hit", False: ", disk cache miss"}.get(getattr(encoder, "last_hit", None), "")
    print(f"vocabulary: {len(classes)} classes x {len(predictor.head.prompt_templates)} templates, "
          f"text embeddings in {predictor.text_seconds:.2f} s{cache}", file=sys.stderr)

    failures = len(unmatched)
    stems = output_stems(files)
    with tqdm(total=len(files), unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(files), predictor.batch_size):
            batch = []
            for path, stem in zip(files[start:start + predictor.batch_size], stems[start:start + predictor.batch_size]):
                try:
                    batch.append((path, stem, predictor.prepare(path)))
                except ImageReadError as e:
                    failures += 1
                    tqdm.write(f"FAILED {e}", file=sys.stderr)
                    bar.update(1)
            if not batch:
                continue
            t0 = time.perf_counter()
            results = predictor.run([prepared for _, _, prepared in batch])
            seconds = (time.perf_counter() - t0) / len(batch)
            for (path, stem, _), result in zip(batch, results):
                try:
                    record = write_outputs(result, path, out_dir, stem, config, weights)
                except OutputError as e:  # a full disk: one line, what is done stays done
                    raise OutputError(f"{e}; {bar.n - failures + len(unmatched)} of {len(files)} images were "
                                      "written before it: free space and rerun") from None
                tqdm.write(summary_line(path, record, seconds))
                bar.update(1)
    done = len(files) - (failures - len(unmatched))
    print(f"{done} of {len(files)} images segmented into {out_dir}"
          f"{f'; {failures} failed' if failures else ''}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
