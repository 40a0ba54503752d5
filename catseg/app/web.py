"""`catseg-web` (and demo/app.py): the web demo, a Gradio page on 127.0.0.1.

    python demo/app.py --config-file configs/vitl_swinb_384.yaml --weights model_final.pth
    catseg-web --model cvpr24-large --model v1-large     # released models by name (--list-models)

Upload an image, type a vocabulary ("cat, kitten; sofa; floor", the CLI's syntax) or pick a
shipped benchmark vocabulary, pick a model, run. The page shows the overlay with its legend, the
share of pixels of each class present, and offers the label PNG and the JSON of the CLI's
schema (catseg/app/outputs.py) as downloads. Bad inputs (not an image, empty vocabulary, too many
pixels) give a message in the page; the server keeps serving.

Models: each --model NAME (repeatable; a released model's config and weights, downloaded on first
use: catseg/weights/models.py), then each --config-file (repeatable; --weights gives each its
checkpoint, in order: a path, an `hf://` name or a huggingface.co link). None
given: the quick-start model when `make demo` has trained it (output/quickstart/model_final.pth),
else configs/tiny.yaml with random weights, behind a banner. One predictor per model is kept in
memory; text embeddings come from the disk cache. "Refine with Segment Anything" labels SAM's
automatic masks with CAT-Seg (catseg/app/sam_refine.py; SAM weights from --sam-weights).

Class names are data, never markup: the status line, legend and table are plain-text
components, so `<b>sky</b>` or `a*b*c` show as typed.

Under load (README "Limits and safety"): requests wait in Gradio's queue (at most --queue-size,
default 16; past it a request is refused with a message) and run --concurrency at a time
(default 1: one model pass at a time; N > 1 keeps N copies of each model in memory). A request
whose client disconnects while it waits is dropped from the queue. Each request's files live in
its own folder; only the newest --keep-results folders (default 8) are kept, and Gradio's own
copies and uploads are deleted after --cache-minutes (default 10). Uploads over --max-upload-mb
(default 20) are refused by the page; images over INPUT.MAX_IMAGE_PIXELS pixels (default 100
Mpixel; `--opts INPUT.MAX_IMAGE_PIXELS N`) give a message from their header, before decoding.
"""
import argparse
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..config import shipped_config
from ..console import setup_cli_logging
from ..data.class_names import load_class_names, shipped_class_lists
from ..errors import CatsegError, report_errors
from ..image_io import ImageReadError
from ..weights.models import format_model_table, released_model
from .outputs import safe_stem, write_outputs
from .predictor import OpenVocabPredictor
from .vocabulary import EmptyVocabularyError, clean_vocabulary, parse_vocabulary

# `make demo` trains the quick-start model into output/quickstart/ of the folder it runs in.
QUICKSTART = (shipped_config("quickstart.yaml"), Path("output") / "quickstart" / "model_final.pth")
TINY = shipped_config("tiny.yaml")
RANDOM_BANNER = ("**Random weights**: no model was given and the quick-start model is not trained "
                 "(`make demo`). The masks are meaningless; start with `--config-file ... --weights ...`.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="catseg-web", description="CAT-Seg web demo (Gradio, 127.0.0.1).")
    p.add_argument("--config-file", action="append", default=[], help="model config; repeat for a model choice")
    p.add_argument("--weights", action="append", default=[], help="checkpoint of each --config-file, in order")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="a released model by name (repeatable; --list-models)")
    p.add_argument("--list-models", action="store_true", help="print the released models and exit")
    p.add_argument("--sam-weights", default="",
                   help="local SAM checkpoint: enables the SAM-refined mode (MODEL.SAM.WEIGHTS)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                   help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests run at a time (default 1: one model pass at a time; N keeps N model copies)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more are refused (default 16)")
    p.add_argument("--keep-results", type=int, default=8, help="newest request folders kept on disk (default 8)")
    p.add_argument("--cache-minutes", type=float, default=10,
                   help="Gradio's copies of uploads and results are deleted after this age (default 10)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest upload accepted, in MB (default 20)")
    p.add_argument("--debug", action="store_true", help="show the traceback of start-up errors (or CATSEG_DEBUG=1)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides for every model: KEY VALUE ...")
    return p


def model_choices(configs: Sequence[str], weights: Sequence[str],
                  names: Sequence[str] = ()) -> Tuple[Dict[str, Tuple[str, str]], bool]:
    """({label: (config, weights)}, random) for the command line; see the module docstring."""
    released = {name: (released_model(name).config_path(), released_model(name).weights) for name in names}
    if configs or released:
        padded = list(weights) + [""] * (len(configs) - len(weights))
        given = {f"{Path(c).stem}" + (f" ({Path(w).name})" if w else ""): (c, w) for c, w in zip(configs, padded)}
        return {**released, **given}, False
    if QUICKSTART[1].is_file():
        return {"quick-start (trained by make demo)": (str(QUICKSTART[0]), str(QUICKSTART[1]))}, False
    return {"tiny (random weights)": (str(TINY), "")}, True


class PredictorPool:
    """Up to `size` predictors of one model, built on first need; `use()` lends an idle one
    (waiting for one when all are busy), so that a predictor runs one request at a time."""

    def __init__(self, build, size: int):
        self.build, self.size, self.built = build, max(1, size), 0
        self.idle: "queue.Queue[OpenVocabPredictor]" = queue.Queue()
        self.lock = threading.Lock()

    def first(self) -> OpenVocabPredictor:
        """A predictor, built now if none is (start-up errors surface here); not lent."""
        with self.use() as predictor:
            return predictor

    @contextmanager
    def use(self) -> Iterator[OpenVocabPredictor]:
        with self.lock:
            grow = self.idle.empty() and self.built < self.size
            self.built += grow
        try:
            predictor = self.build() if grow else self.idle.get()
        except BaseException:
            with self.lock:
                self.built -= 1
            raise
        try:
            yield predictor
        finally:
            self.idle.put(predictor)


class ResultFolders:
    """One folder per request under a temporary root; creating one removes all but the newest
    `keep` (so disk use is bounded by `keep` results, whatever the number of requests)."""

    def __init__(self, keep: int):
        self.root = Path(tempfile.mkdtemp(prefix="catseg-web-"))
        self.keep = max(1, keep)
        self.lock = threading.Lock()
        self.count = 0

    def new(self) -> Path:
        with self.lock:
            self.count += 1
            folder = self.root / f"{self.count:08d}"
            folder.mkdir()
            for old in sorted(self.root.iterdir())[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return folder


class WebDemo:
    """The page's logic, without Gradio: a pool of predictors per model choice, `segment` per
    request. `concurrency` requests may run at once (each on its own predictor); the newest
    `keep_results` requests' files stay on disk (at least `concurrency`: those still in use)."""

    def __init__(self, models: Dict[str, Tuple[str, str]], opts: Sequence[str] = (), concurrency: int = 1,
                 keep_results: int = 8):
        self.models = models
        self.opts = list(opts)
        self.concurrency = max(1, concurrency)
        self.pools: Dict[Tuple[str, str], PredictorPool] = {}
        self.pools_lock = threading.Lock()
        self.results = ResultFolders(max(keep_results, self.concurrency))

    @property
    def out_root(self) -> Path:
        return self.results.root

    def pool(self, choice: str, refine: str = "") -> PredictorPool:
        """The predictors of model `choice` (with `refine`, see OpenVocabPredictor)."""
        with self.pools_lock:
            if (choice, refine) not in self.pools:
                config, weights = self.models[choice]
                self.pools[choice, refine] = PredictorPool(  # the page shows labels only: labels-only output
                    lambda: OpenVocabPredictor(config, weights=weights or None, opts=self.opts, refine=refine,
                                               output="labels"),
                    self.concurrency)
            return self.pools[choice, refine]

    def predictor(self, choice: str, refine: str = "") -> OpenVocabPredictor:
        """A predictor of model `choice`, built now if none is (start-up errors surface here)."""
        return self.pool(choice, refine).first()

    @staticmethod
    def vocabulary(text: str, benchmark: str) -> List[str]:
        """The vocabulary box if it has names, else the chosen benchmark's list."""
        if text and text.strip():
            return parse_vocabulary(text)
        if benchmark:
            return clean_vocabulary(load_class_names(benchmark))
        raise EmptyVocabularyError("empty vocabulary: type class names (\"cat, kitten; sofa\") or pick a benchmark")

    def segment(self, image_path: Optional[str], text: str, benchmark: str, choice: str, sam: bool = False):
        """-> (status, overlay path, legend, table rows, [label PNG, JSON]); errors -> status only."""
        if not image_path:
            return "Upload an image first.", None, "", [], []
        try:
            vocabulary = self.vocabulary(text, benchmark)
            with self.pool(choice, "sam" if sam else "").use() as predictor:
                start = time.perf_counter()
                result = predictor.predict(image_path, vocabulary)
                seconds = time.perf_counter() - start
            out = self.results.new()
            stem = safe_stem(Path(image_path))
            config, weights = self.models[choice]
            record = write_outputs(result, Path(image_path), out, stem, config, weights)
        except (ImageReadError, EmptyVocabularyError, CatsegError, ValueError) as e:
            return f"Error: {str(e).replace(image_path, Path(image_path).name)}", None, "", [], []
        rows = [[record["classes"][i]["name"], f"{record['classes'][i]['pixel_share']:.1%}"] for i in record["present"]]
        legend = "Classes present: " + "; ".join(name for name, _ in rows)
        h, w = record["image_size"]
        status = f"Done: {w}x{h}, {len(vocabulary)} classes, {seconds:.2f} s."
        print(f"request {out.name}: {status}", file=sys.stderr, flush=True)  # the server's log: one line a request
        downloads = [str(out / record["label_map"]), str(out / f"{stem}.json")]
        return status, str(out / record["overlay"]), legend, rows, downloads


def build_page(app: WebDemo, random_weights: bool, cache_minutes: float = 10):
    """The Gradio Blocks page around `app`; Gradio's cached files are deleted after `cache_minutes`."""
    import gradio as gr

    age = max(1, round(cache_minutes * 60))
    with gr.Blocks(title="catseg: open-vocabulary segmentation", delete_cache=(max(1, age // 4), age)) as page:
        gr.Markdown("# catseg: segment an image with your own words")
        if random_weights:
            gr.Markdown(RANDOM_BANNER, elem_id="banner")
        with gr.Row():
            with gr.Column():
                image = gr.File(label="Image (PNG, JPEG, ...)", file_types=["image"], type="filepath", elem_id="image")
                vocab = gr.Textbox(label='Vocabulary: classes separated by ";", synonyms by ","',
                                   placeholder="cat, kitten; sofa; floor", elem_id="vocab")
                benchmark = gr.Dropdown([""] + shipped_class_lists(), value="", label="or a benchmark vocabulary",
                                        elem_id="benchmark")
                choices = list(app.models)
                model = gr.Dropdown(choices, value=choices[0], label="Model", elem_id="model")
                sam = gr.Checkbox(False, label="Refine with Segment Anything (SAM masks labelled by CAT-Seg)",
                                  elem_id="sam")
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column():
                # plain-text components: class names are shown as typed, never as markup
                status = gr.Textbox("", label="Status", interactive=False, elem_id="status")
                overlay = gr.Image(label="Overlay and legend", type="filepath", elem_id="overlay")
                legend = gr.Textbox("", label="Legend", interactive=False, elem_id="legend")
                table = gr.Dataframe(headers=["class", "pixel share"], datatype=["str", "str"], label="Classes present",
                                     interactive=False, elem_id="table")
                files = gr.File(label="Label map (PNG) and JSON", file_count="multiple", elem_id="downloads")
        image.change(lambda _: "", image, status)  # a new image: the last run's message no longer applies
        run.click(app.segment, [image, vocab, benchmark, model, sam], [status, overlay, legend, table, files],
                  show_progress="full", api_name="segment")
    return page


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        print(report_errors(format_model_table, debug=args.debug))
        return 0
    setup_cli_logging()

    def start():
        models, random_weights = model_choices(args.config_file, args.weights, args.model)
        app = WebDemo(models, args.opts + (["MODEL.SAM.WEIGHTS", args.sam_weights] if args.sam_weights else []),
                      concurrency=args.concurrency, keep_results=args.keep_results)
        app.predictor(next(iter(models)))  # load the first model now: start-up errors are one line here
        print(f"web demo on http://{args.host}:{args.port} (Ctrl+C to stop)", file=sys.stderr, flush=True)
        page = build_page(app, random_weights, args.cache_minutes)
        page.queue(max_size=args.queue_size, default_concurrency_limit=app.concurrency).launch(
            server_name=args.host, server_port=args.port, show_error=False, quiet=True,
            max_file_size=round(args.max_upload_mb * 2**20))
        return 0

    return report_errors(start, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
