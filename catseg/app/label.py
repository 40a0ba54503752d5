"""`catseg-label` (and demo/label.py): label a whole collection, or a video, with your class names.

    catseg-label --config-file configs/vitl_swinb_384.yaml --input photos/ more/*.jpg list.txt \\
        --output labelled/ --vocab "cat; sofa; floor" --opts MODEL.WEIGHTS model.pth
    catseg-label ... --num-gpus 8                                   # 8 GPUs (or 8 CPU processes)
    catseg-label ... --num-gpus 8 --num-machines 2 --machine-rank 0 --dist-url tcp://host0:29500
    catseg-label ... --video-input clip.mp4 --output out/ [--save-frames]   # catseg/app/video.py

Inputs: files, folders (not recursive), glob patterns and .txt lists of paths, listed lazily
(catseg/app/input_stream.py). The launcher flags are detectron2's, as for train_net.py: the
listing is cut into blocks of 4 x --batch-size consecutive inputs, dealt out to the processes
in turn, so a restart with the same inputs gives the same split. Within a process,
`--loader-workers` DataLoader workers decode and downscale images while the network runs, and
each block's images are batched by size (catseg/app/image_stream.py). With MODEL.DEVICE cpu, or
without CUDA, the processes run on the CPU (gloo) and share its cores: `--threads` each
(default: cores / --num-gpus). Several machines need a shared output folder.

Reproducible labels: the batches depend on the inputs and --batch-size only, so on GPUs, and on
the CPU with the same --threads, 1 or N processes write byte-identical label files. (Float
results move by about 1e-7 with the batch's make-up or the CPU thread count, enough to flip the
argmax of a pixel where two classes tie.)

The output folder (layout in catseg/app/label_folder.py) holds the label PNGs, classes.json and
train.yaml, a config that trains on them as they are:
`python train_net.py --config-file labelled/train.yaml`.

Resuming: run the same command again. An image whose record (OUT/records/<stem>.json, written
last) exists is skipped without being opened; `--overwrite` labels everything again. Every file
is written atomically. An unreadable image goes into OUT/failures.jsonl (path and one-line
reason) and the run goes on. At the end each process prints its counts and images/s, and the
first one the totals (also in OUT/summary.json).

Exit status: 0 when every input was labelled or skipped, 1 when some failed or a process died
(run again to resume), 2 for start-up errors (one `error: ...` line).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch.multiprocessing.spawn import ProcessException
from tqdm import tqdm

from ..config import load_config, shipped_config
from ..console import run_command, write_line
from ..errors import ConfigError
from ..weights.pretrained import check_weights_file
from .cli import DEFAULT_CONFIG, choose_vocabulary
from .image_stream import BLOCK_BATCHES, ImageStream, segmented
from .input_stream import iter_inputs, iter_spec
from .label_folder import LabelFolder, read_failures, write_json
from .output_dir import make_output_dir
from .vocabulary import EmptyVocabularyError

DEFAULT_TRAIN_BASE = "own_data.yaml"  # _BASE_ of OUT/train.yaml
MODEL_SEED = 0  # torch seed before the model is built: random weights agree between processes and runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="catseg-label", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Label a collection of images (or a video) with your class names: "
                                            "sharded over processes and machines, resumable.",
                                epilog="Output folder layout: catseg/app/label_folder.py. Video: catseg/app/video.py.")
    p.add_argument("--config-file", default="", help=f"model config (default {DEFAULT_CONFIG}, random weights)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders, glob patterns or .txt lists of paths")
    source.add_argument("--video-input", help="a video file: segmented frame by frame into an overlay video")
    p.add_argument("--output", required=True, help="output folder (created)")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--vocab", help='class names: "cat, kitten; sky" (";" classes, "," synonyms)')
    vocab.add_argument("--vocab-file", help="class names: .json list or .txt (one class per line)")
    vocab.add_argument("--dataset-vocab", help="a benchmark's class list (ade150, ade847, coco, pc59, ...)")
    p.add_argument("--batch-size", type=int, default=4, help="images per network pass (default 4)")
    p.add_argument("--bf16", action="store_true",
                   help="run the network in bfloat16 (TEST.BF16): faster, approximate; measured in "
                   "benchmarks/RESULTS.md")
    p.add_argument("--loader-workers", type=int, default=2, help="decoding processes per labelling process")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per labelling process on the CPU (default: cores / --num-gpus)")
    p.add_argument("--overwrite", action="store_true", help="label images again even if they are done")
    p.add_argument("--save-probs", action="store_true", help="also write the top-k classes and scores per pixel")
    p.add_argument("--top-k", type=int, default=3, help="classes per pixel kept by --save-probs (default 3)")
    p.add_argument("--overlay", action="store_true", help="also write an overlay PNG per image")
    p.add_argument("--save-frames", action="store_true", help="with --video-input: a label PNG per frame too")
    p.add_argument("--train-base", default=DEFAULT_TRAIN_BASE, help="_BASE_ config of OUT/train.yaml")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per machine: GPUs, or CPU processes with MODEL.DEVICE cpu (default 1)")
    p.add_argument("--num-machines", type=int, default=1, help="machines taking part (default 1)")
    p.add_argument("--machine-rank", type=int, default=0, help="rank of this machine, 0..num-machines-1")
    p.add_argument("--dist-url", default="auto", help="rendezvous URL of several machines (default: a free local port)")
    p.add_argument("--debug", action="store_true", help="show the traceback of start-up errors (or CATSEG_DEBUG=1)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: start(args), debug=args.debug)


def start(args) -> int:
    """Check the arguments, then label the video or launch the labelling processes."""
    try:
        vocabulary = choose_vocabulary(args)
    except (EmptyVocabularyError, FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    config = args.config_file or str(shipped_config(DEFAULT_CONFIG))
    world_size = args.num_gpus * args.num_machines
    counts = (args.num_gpus, args.num_machines, args.batch_size, args.top_k)
    if min(counts) < 1 or not 0 <= args.machine_rank < args.num_machines:
        raise ConfigError("--num-gpus, --num-machines, --batch-size and --top-k must be >= 1, "
                          "and --machine-rank within 0..num-machines-1")
    opts = (["TEST.BF16", "True"] if args.bf16 else []) + args.opts
    cfg = load_config(config, opts)  # config and weights mistakes: one line, before any process starts
    check_weights_file(cfg.MODEL.WEIGHTS)
    out = make_output_dir(args.output)
    if args.video_input:
        if world_size > 1:
            raise ConfigError("--video-input runs in one process: leave out --num-gpus / --num-machines")
        from .video import label_video

        return label_video(args, cfg, vocabulary, out)
    from ..engine.launch import launch

    folder = LabelFolder(out)
    earlier = folder.classes()
    if vocabulary is not None and earlier is not None and earlier != vocabulary and not args.overwrite:
        raise ConfigError(f"{out} was labelled with other classes ({len(earlier)} in {out / 'classes.json'}); "
                          "add --overwrite to label everything again, or choose another --output")
    folder.summary.unlink(missing_ok=True)
    try:
        launch(label_process, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args, cfg, vocabulary), device=cfg.MODEL.DEVICE)
    except ProcessException as e:  # a process died (killed, out of memory): what is written stays written
        print(f"error: a labelling process stopped ({str(e).strip().splitlines()[-1]}); "
              "run the same command again to resume", file=sys.stderr)
        return 1
    if args.machine_rank != 0:
        return 0
    summary = read_summary(folder)
    return 1 if summary is None or summary["failed"] else 0


def read_summary(folder: LabelFolder) -> Optional[dict]:
    return json.loads(folder.summary.read_text()) if folder.summary.exists() else None


class Listing:
    """(path, path) pairs of the inputs, listed lazily each time it is iterated (re-iterable and
    picklable, for the DataLoader workers)."""

    def __init__(self, specs: Sequence[str]):
        self.specs = list(specs)

    def __iter__(self):
        return ((p, p) for p in iter_inputs(self.specs))


class NotDone:
    """should_load of the stream: inputs without a record (everything with --overwrite)."""

    def __init__(self, folder: LabelFolder, overwrite: bool):
        self.folder, self.overwrite = folder, overwrite

    def __call__(self, path: str) -> bool:
        return self.overwrite or not self.folder.is_done(path)


def label_process(args, cfg, vocabulary: Optional[List[str]]) -> dict:
    """One labelling process (the launcher calls it once per rank): label this rank's shard,
    then gather the counts; returns this process's counts."""
    from detectron2.utils import comm

    from .predictor import OpenVocabPredictor

    rank, world_size = comm.get_rank(), comm.get_world_size()
    cfg = cfg.clone()
    if cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = f"cuda:{comm.get_local_rank()}"
    else:  # the CPU processes of a machine share its cores
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.num_gpus))
    write_line(f"rank {rank}/{world_size}: pid {os.getpid()}")
    torch.manual_seed(MODEL_SEED)  # weights not in MODEL.WEIGHTS are the same random ones in every process
    predictor = OpenVocabPredictor(cfg, batch_size=args.batch_size, output="labels",  # labels and top-k only
                                   topk=args.top_k if args.save_probs else 1)
    classes = predictor.set_vocabulary(vocabulary if vocabulary is not None else predictor.classes)
    folder = LabelFolder(Path(args.output))
    folder.make_dirs(args.save_probs, args.overlay)
    if rank == 0:
        folder.write_classes(classes)
        folder.write_train_config(classes, args.train_base)
    # a spec matching nothing is one failure line (checked by rank 0, up to its first match)
    unmatched = [spec for spec in args.input if rank == 0 and next(iter_spec(spec), None) is None]
    for spec in unmatched:
        folder.add_failure(spec, "no file or folder matches")
    stream = ImageStream(Listing(args.input), BLOCK_BATCHES * args.batch_size, rank, world_size,
                         max_side=predictor.max_side, should_load=NotDone(folder, args.overwrite))
    counts = {"rank": rank, "done": 0, "skipped": 0, "failed": len(unmatched), "seconds": 0.0}
    start = time.perf_counter()
    with tqdm(unit="img", file=sys.stderr, dynamic_ncols=True, disable=rank != 0,
              desc=f"rank 0 of {world_size}") as bar:
        for item, result in segmented(predictor, stream, args.loader_workers):
            if item.skipped:
                counts["skipped"] += 1
            elif result is None:
                counts["failed"] += 1
                folder.add_failure(item.key, item.error)
                tqdm.write(f"FAILED {item.error}\n", file=sys.stderr, end="")  # one write: see write_line
            else:
                folder.write(item.key, result, args.top_k if args.save_probs else 0, args.overlay)
                counts["done"] += 1
            bar.update(1)
    counts["seconds"] = time.perf_counter() - start
    write_line(summary_line(f"rank {rank}", counts))
    everyone = comm.all_gather(counts)
    if rank == 0:
        finish(folder, everyone)
    return counts


def summary_line(who: str, counts: dict) -> str:
    rate = counts["done"] / counts["seconds"] if counts["seconds"] > 0 else 0.0
    return (f"{who}: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed, "
            f"{rate:.2f} images/s")


def finish(folder: LabelFolder, everyone: List[dict]) -> None:
    """Totals of all processes: printed and written to OUT/summary.json; failures.jsonl tidied."""
    total = {key: sum(c[key] for c in everyone) for key in ("done", "skipped", "failed")}
    total["seconds"] = max(c["seconds"] for c in everyone)
    kept = folder.tidy_failures()
    folder.remove_temporary_files()  # every process is past its last write (all_gather)
    print(summary_line(f"total ({len(everyone)} processes)", total)
          + (f"; failures in {folder.failures} ({kept})" if kept else ""), file=sys.stderr, flush=True)
    rates = [c["done"] / c["seconds"] if c["seconds"] > 0 else 0.0 for c in everyone]
    write_json(folder.summary, {**total, "images_per_s": total["done"] / total["seconds"] if total["seconds"] else 0.0,
                                "processes": [{**c, "images_per_s": r} for c, r in zip(everyone, rates)],
                                "failures": [f["path"] for f in read_failures(folder.failures)][:100]})


if __name__ == "__main__":
    sys.exit(main())
