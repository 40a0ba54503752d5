"""The paper's six-benchmark evaluation in one run, resumable, with one table at the end.

  python train_net.py --config-file configs/vitl_swinb_384.yaml --eval-only --benchmarks all \
      MODEL.WEIGHTS model_final.pth OUTPUT_DIR output/eval [--strict] [--num-gpus N]

Protocols in the paper's table order (A-847, PC-459, A-150, PC-59, PAS-20, PAS-20b): each is a
class list and a dataset, evaluated with the official protocol (sliding window, class-aggregation
pooling [1, 1] at inference: TEST.SLIDING_WINDOW True, TEST.POOLING_SIZES [1, 1]). The model is
built and loaded once; each benchmark sets its class list and runs the dataset's evaluator
inside the detectron2 launcher (multi-GPU, multi-machine as for --eval-only).

Under OUTPUT_DIR/benchmarks/: `<dataset>/metrics.json` per benchmark (written when it finishes;
an existing one is read instead of evaluating again, so an interrupted run resumes), and the
table as `table.md`, `table.csv`, `table.json`, also printed: per benchmark the mIoU in both
conventions, one line each (`mIoU`, the papers'; `mIoU (v0.6 wheel)`, detectron2 v0.6's; see
catseg/evaluation.py), and fwIoU and pACC in the JSON. A missing dataset is one warning line and
the next benchmark runs; with `strict` it raises.
"""
import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from detectron2.utils import comm

from ..atomic import atomic_write
from ..config import load_config
from ..data.class_names import load_class_names
from ..data.datasets import DatasetNotFoundError
from ..evaluation import PAPER_MIOU, WHEEL_MIOU

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """One benchmark of the paper's table."""

    name: str  # column title in the paper
    key: str  # name on the command line
    class_list: str  # shipped class list the model is prompted with
    dataset: str  # registered dataset


PROTOCOLS = (
    Protocol("A-847", "a847", "ade847", "ade20k_full_sem_seg_freq_val_all"),
    Protocol("PC-459", "pc459", "pc459", "context_459_test_sem_seg"),
    Protocol("A-150", "a150", "ade150", "ade20k_150_test_sem_seg"),
    Protocol("PC-59", "pc59", "pc59", "context_59_test_sem_seg"),
    Protocol("PAS-20", "pas20", "voc20", "voc_2012_test_sem_seg"),
    Protocol("PAS-20b", "pas20b", "voc20b", "voc_2012_test_background_sem_seg"),
)
PROTOCOL_OPTS = ["TEST.SLIDING_WINDOW", "True", "TEST.POOLING_SIZES", "[1, 1]"]  # shared by all six
METRICS = (PAPER_MIOU, WHEEL_MIOU, "fwIoU", "pACC")  # kept per benchmark in the JSON table
TABLE_METRICS = (PAPER_MIOU, WHEEL_MIOU)  # one line each in the markdown and CSV tables


def select_protocols(spec: str) -> List[Protocol]:
    """Protocols named in `spec`: "all", or comma-separated keys / names / datasets, e.g. "a150,pc59"."""
    if spec.strip().lower() == "all":
        return list(PROTOCOLS)
    chosen = []
    for item in (s.strip().lower() for s in spec.split(",") if s.strip()):
        match = [p for p in PROTOCOLS if item in (p.key, p.name.lower(), p.dataset)]
        if not match:
            raise ValueError(f"--benchmarks {item!r}: expected 'all' or some of {', '.join(p.key for p in PROTOCOLS)}")
        chosen += [p for p in match if p not in chosen]
    return [p for p in PROTOCOLS if p in chosen]  # paper order


def benchmark_config(cfg):
    """`cfg` with the official evaluation protocol (shared by the six benchmarks)."""
    return load_config(cfg, PROTOCOL_OPTS)


def result_file(output_dir: str, protocol: Protocol) -> str:
    return os.path.join(output_dir, "benchmarks", protocol.dataset, "metrics.json")


def evaluate_protocol(cfg, model, protocol: Protocol, test_fn) -> Dict:
    """Metrics of `model` on one benchmark: its classes, its dataset, test_fn(cfg, model) -> results."""
    bench_cfg = load_config(cfg, ["MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", protocol.class_list,
                                  "DATASETS.TEST", f"('{protocol.dataset}',)",
                                  "OUTPUT_DIR", os.path.join(cfg.OUTPUT_DIR, "benchmarks", protocol.dataset)])
    model.sem_seg_head.predictor.set_test_classes(load_class_names(protocol.class_list))
    return test_fn(bench_cfg, model)


def run_benchmarks(cfg, model, protocols: Sequence[Protocol], test_fn, check_fn, strict: bool = False) -> Dict:
    """Evaluate `protocols` in order (skipping finished ones); write and print the table.

    test_fn(cfg, model) -> detectron2 results; check_fn(cfg, dataset) raises
    DatasetNotFoundError when the dataset is not on disk. Returns {benchmark name: results or
    None (dataset missing)}.
    """
    results: Dict[str, Optional[Dict]] = {}
    for protocol in protocols:
        path = result_file(cfg.OUTPUT_DIR, protocol)
        if os.path.isfile(path):
            with open(path) as f:
                results[protocol.name] = json.load(f)
            logger.info(f"{protocol.name}: already evaluated ({path}), skipped")
            continue
        try:
            check_fn(cfg, protocol.dataset)
        except DatasetNotFoundError as e:
            if strict:
                raise
            logger.warning(f"{protocol.name}: not evaluated, {e}")
            results[protocol.name] = None
            continue
        logger.info(f"{protocol.name}: evaluating {protocol.dataset} with {protocol.class_list} classes")
        results[protocol.name] = evaluate_protocol(cfg, model, protocol, test_fn)
        if comm.is_main_process():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda f: json.dump(results[protocol.name], f, indent=2), mode="w")
        comm.synchronize()
    if comm.is_main_process():
        write_tables(os.path.join(cfg.OUTPUT_DIR, "benchmarks"), protocols, results)
    return results


def table_rows(protocols: Sequence[Protocol], results: Dict) -> List[Dict]:
    """One row per result kind ("sem_seg", and "sem_seg_TTA" with test-time augmentation):
    {"result": kind, benchmark name: {metric: value} or None}."""
    kinds = sorted({k for r in results.values() if r for k in r})
    return [{"result": kind, **{p.name: ({m: results[p.name][kind].get(m) for m in METRICS}
                                    if results.get(p.name) and kind in results[p.name] else None)
                          for p in protocols}} for kind in kinds]


def cell(metrics: Optional[Dict], metric: str, spec: str, missing: str) -> str:
    """`metrics[metric]` formatted with `spec`; `missing` where not evaluated (or, in a
    metrics.json written before the metric existed, not recorded)."""
    value = metrics.get(metric) if metrics else None
    return missing if value is None else format(value, spec)


def markdown_table(protocols: Sequence[Protocol], rows: List[Dict]) -> str:
    """One line per result kind and TABLE_METRICS entry, one column per benchmark; "-" where not evaluated."""
    lines = ["| result | metric | " + " | ".join(p.name for p in protocols) + " |", "|---" * (len(protocols) + 2) + "|"]
    for row in rows:
        for metric in TABLE_METRICS:
            cells = [cell(row[p.name], metric, ".1f", "-") for p in protocols]
            lines.append(f"| {row['result']} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(protocols: Sequence[Protocol], rows: List[Dict]) -> str:
    """The markdown table's lines as CSV, two decimals, empty where not evaluated."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["result", "metric"] + [p.name for p in protocols])
    for row in rows:
        for metric in TABLE_METRICS:
            writer.writerow([row["result"], metric] + [cell(row[p.name], metric, ".2f", "") for p in protocols])
    return buffer.getvalue()


def write_tables(folder: str, protocols: Sequence[Protocol], results: Dict) -> str:
    """table.md / table.csv / table.json under `folder`; logs and returns the markdown."""
    os.makedirs(folder, exist_ok=True)
    rows = table_rows(protocols, results)
    markdown = markdown_table(protocols, rows)
    missing = [p.name for p in protocols if results.get(p.name) is None]
    document = {"benchmarks": [p.name for p in protocols], "datasets": {p.name: p.dataset for p in protocols},
                "rows": rows, "not_evaluated": missing}
    atomic_write(os.path.join(folder, "table.md"), lambda f: f.write(markdown + "\n"), mode="w")
    atomic_write(os.path.join(folder, "table.csv"), lambda f: f.write(csv_table(protocols, rows)), mode="w")
    atomic_write(os.path.join(folder, "table.json"), lambda f: json.dump(document, f, indent=2), mode="w")
    note = f"\n(not evaluated: {', '.join(missing)})" if missing else ""
    logger.info(f"mIoU on the benchmarks ({PAPER_MIOU}: the papers' convention; tables in {folder}):\n{markdown}{note}")
    print(markdown + note)
    return markdown
