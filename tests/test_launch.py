"""The launcher (detectron2's, gloo on CPU) closes each worker's process groups once the job
returns: a worker that exits with its gloo group open can abort while the interpreter shuts
down, failing a run whose work was done."""
import atexit
from pathlib import Path

import torch.distributed as dist
from detectron2.utils import comm

from catseg.engine.launch import launch


def _job(out_dir: str) -> None:
    """Gathers across ranks, then leaves a note written at interpreter exit: is a group still open?"""
    assert comm.all_gather(comm.get_rank()) == [0, 1]
    note = Path(out_dir) / f"rank{comm.get_rank()}"
    atexit.register(lambda: note.write_text(f"open={dist.is_initialized()}"))


def test_workers_close_their_process_groups_before_exit(tmp_path):
    launch(_job, 2, dist_url="auto", args=(str(tmp_path),), device="cpu")
    notes = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert notes == {"rank0": "open=False", "rank1": "open=False"}
