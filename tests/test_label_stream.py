"""The pieces of catseg-label in one process: lazy listing and stable shards (100,000 paths in
bounded memory, nothing opened), the restart's skip check (no image opened), size-grouped
batches, and `segment_many` (input order, DataLoader workers, unreadable images)."""
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_cfg
from PIL import Image

from catseg.app.image_stream import ImageStream, Item, in_input_order, size_batches
from catseg.app.input_stream import iter_blocks, iter_inputs
from catseg.app.label import Listing, NotDone, build_parser
from catseg.app.label_folder import LabelFolder
from catseg.app.predictor import OpenVocabPredictor, Segmentation
from catseg.image_io import ImageReadError

VOCAB = ["sky", "grass", "sea"]
OPENED = []  # paths opened while RECORDING is set (an audit hook cannot be removed: it checks the flag)
RECORDING = [False]


def _audit(event, args):
    if RECORDING[0] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        OPENED.append(str(args[0]))


sys.addaudithook(_audit)


def write_list(path: Path, count: int) -> Path:
    with open(path, "w") as f:
        for i in range(count):
            f.write(f"photos/{i // 1000:03d}/img_{i:07d}.jpg\n")
    return path


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def ours(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes held, leaving out blocks allocated inside pathlib: its sys.intern of path parts
    resizes the interpreter's interned-string table, whose size follows every live interned
    string (torch's thousands included), not our inputs."""
    kept = snapshot.filter_traces([tracemalloc.Filter(False, pathlib.__file__)])
    return sum(s.size for s in kept.statistics("filename"))


def shard(specs, rank, world_size, block=16):
    return [path for b in iter_blocks(iter_inputs(specs), block, rank, world_size) for _, path in b]


def test_listing_and_sharding_100000_paths_in_bounded_memory(tmp_path):
    big, small = write_list(tmp_path / "big.txt", 100_000), write_list(tmp_path / "small.txt", 10_000)
    counts = {}

    def count(list_file, rank):
        counts[(list_file.name, rank)] = sum(len(b) for b in iter_blocks(iter_inputs([str(list_file)]), 16, rank, 2))

    peaks = [peak_bytes(lambda: count(small, 0)), peak_bytes(lambda: count(big, 0))]
    count(big, 1)
    assert counts[("big.txt", 0)] == counts[("big.txt", 1)] == 50_000
    assert peaks[1] < 256 * 1024 and peaks[1] < 2 * peaks[0] + 64 * 1024, peaks  # 10x the paths, same memory


def test_the_whole_stream_over_100000_missing_paths_holds_no_list(tmp_path):
    """Through ImageStream as catseg-label runs it: each path is a failure ("no such file", from a
    stat, never an open), and memory stays bounded."""
    big = write_list(tmp_path / "big.txt", 100_000)
    stream = ImageStream(Listing([str(big)]), 16, 1, 2, should_load=NotDone(LabelFolder(tmp_path / "out"), False))
    seen = {"items": 0, "failed": 0}
    held = []
    RECORDING[0] = True
    tracemalloc.start()
    try:
        for block in stream:
            for item in block:
                seen["items"] += 1
                seen["failed"] += "no such file" in item.error
                if seen["items"] % 5000 == 0:
                    held.append(ours(tracemalloc.take_snapshot()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        RECORDING[0] = False
    assert seen["items"] == seen["failed"] == 50_000
    assert len(held) == 10 and max(held) < 256 * 1024 and held[-1] < held[0] + 64 * 1024, held
    assert peak < 32 * 2**20  # the whole stream, interned-string table included
    assert [p for p in OPENED if "img_" in p] == []


def test_shards_are_stable_disjoint_and_complete(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(60):
        (folder / f"{i:03d}.png").write_bytes(b"")
    (folder / "notes.md").write_text("not an image")
    everything = list(iter_inputs([str(folder)]))
    assert len(everything) == 60
    shards = [shard([str(folder)], r, 3, block=4) for r in range(3)]
    assert sorted(p for s in shards for p in s) == sorted(everything) and all(len(s) == 20 for s in shards)
    assert [shard([str(folder)], r, 3, block=4) for r in range(3)] == shards  # listed again: the same split
    assert shard([str(folder)], 0, 1, block=4) == everything
    unmatched = []
    assert list(iter_inputs([str(tmp_path / "nothing*.jpg")], unmatched)) == [] and len(unmatched) == 1


def test_restart_skips_done_images_without_opening_them(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"{i:02d}.png")
    out = LabelFolder(tmp_path / "out")
    out.make_dirs(probs=False, overlays=False)
    for i in range(0, 20, 2):  # even images are done
        out.path("records", f"{i:02d}").write_text("{}")
    stream = ImageStream(Listing([str(folder)]), 8, should_load=NotDone(out, overwrite=False))
    RECORDING[0] = True
    try:
        items = [item for block in stream for item in block]
    finally:
        RECORDING[0] = False
    skipped = sorted(Path(it.key).stem for it in items if it.skipped)
    assert skipped == [f"{i:02d}" for i in range(0, 20, 2)]
    assert sorted(Path(it.key).stem for it in items if it.ready) == [f"{i:02d}" for i in range(1, 20, 2)]
    opened = {Path(p).name for p in OPENED if str(folder) in p}
    assert opened == {f"{i:02d}.png" for i in range(1, 20, 2)}  # the done ones were never opened
    redo = ImageStream(Listing([str(folder)]), 8, should_load=NotDone(out, overwrite=True))
    assert all(it.ready for block in redo for it in block)


def item(index, h, w):
    return Item(index, index, rgb=np.zeros((h, w, 3), np.uint8), size=(h, w))


def test_size_batches_group_a_blocks_sizes():
    sizes = [(10, 20), (30, 30), (10, 20), (5, 5), (30, 30), (10, 20)]
    block = [item(i, h, w) for i, (h, w) in enumerate(sizes)] + [Item(6, 6, error="unreadable")]
    batches = [[it.index for it in b] for b in size_batches(block, 2)]
    assert batches == [[3, 0], [2, 5], [1, 4]]  # sorted by size, then input order; failures left out


def test_in_input_order():
    pairs = [(item(i, 1, 1), i) for i in (2, 0, 1, 4, 3)]
    assert [r for _, r in in_input_order(pairs)] == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    torch.manual_seed(0)
    cache = tmp_path_factory.mktemp("text_cache")
    return OpenVocabPredictor(make_cfg(opts=["MODEL.SEM_SEG_HEAD.TEXT_CACHE_DIR", str(cache)]), batch_size=3)


def test_segment_many_is_predict_in_input_order(predictor, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(64, 96), (96, 64), (64, 96), (80, 80), (64, 96), (50, 70), (96, 64)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    inputs = paths[:3] + [bad] + paths[3:]
    expected = predictor.predict(paths, VOCAB)
    for workers in (0, 2):
        results = list(predictor.segment_many(inputs, num_workers=workers, errors="yield"))
        assert len(results) == len(inputs) and isinstance(results[3], ImageReadError) and "bad.jpg" in str(results[3])
        got = results[:3] + results[4:]
        for r, e in zip(got, expected):
            assert r.image_size == e.image_size and torch.equal(r.labels, e.labels)
    with pytest.raises(ImageReadError, match="bad.jpg"):
        list(predictor.segment_many(inputs))


def readme_label_commands():
    """The catseg-label command lines of README.md's "Label a collection" (continuations joined)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Label a collection", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return section, [line.split("#")[0] for line in lines if line.strip().startswith("catseg-label")]


def test_readme_commands_are_valid():
    section, commands = readme_label_commands()
    assert "python train_net.py --config-file labelled/train.yaml" in section
    assert len(commands) == 5
    for line in commands:
        words = shlex.split(line.replace("...", "--input photos/ --output labelled/"))[1:]
        args = build_parser().parse_args(words)
        assert args.output and (args.input or args.video_input)
    assert any("--num-machines" in c and "--machine-rank 1" in c and "--dist-url" in c for c in commands)
    assert any("--video-input" in c for c in commands)


def test_missing_weights_is_one_line_before_any_process(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "demo" / "label.py"), "--input", str(tmp_path), "--output",
                           str(tmp_path / "out"), "--num-gpus", "2", "--opts", "MODEL.WEIGHTS", "missing.pth"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "missing.pth" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "rank 0" not in proc.stderr


def test_top_k_below_one_is_one_line_naming_the_flag(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "demo" / "label.py"), "--input", str(tmp_path), "--output",
                           str(tmp_path / "out"), "--save-probs", "--top-k", "0"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "--top-k" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "rank 0" not in proc.stderr


def test_other_vocabulary_in_a_labelled_folder_is_one_line(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "out").mkdir()
    LabelFolder(tmp_path / "out").write_classes(["cat", "dog"])
    proc = subprocess.run([sys.executable, str(repo / "demo" / "label.py"), "--input", str(tmp_path), "--output",
                           str(tmp_path / "out"), "--vocab", "cat; sofa"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "--overwrite" in errors[0], proc.stderr[-2000:]


def test_more_than_255_classes_give_uint16_labels(tmp_path):
    classes = [f"class {i}" for i in range(300)]
    labels = torch.arange(64 * 48).reshape(48, 64) % 300
    probs = torch.nn.functional.one_hot(labels, 300).permute(2, 0, 1).float()
    result = Segmentation(labels=labels, probs=probs, classes=classes, image=np.zeros((48, 64, 3), np.uint8),
                          image_size=(48, 64))
    folder = LabelFolder(tmp_path / "out")
    folder.make_dirs(probs=True, overlays=False)
    source = tmp_path / "photo.png"
    source.write_bytes(b"")
    folder.write(str(source), result, top_k=2)
    with Image.open(folder.path("labels", "photo")) as im:
        assert np.array_equal(np.asarray(im), labels.numpy()) and np.asarray(im).max() == 299
    saved = np.load(folder.path("probs", "photo"))
    assert saved["classes"].dtype == np.uint16 and np.array_equal(saved["classes"][0], labels.numpy())
    assert saved["scores"].dtype == np.float16 and (saved["scores"][0] == 1).all() and (saved["scores"][1] == 0).all()
    config = folder.write_train_config(classes, "own_data.yaml").read_text()
    assert "classes.json:65535" in config  # 255 is a class here: the ignore value moves to 65535


ORPHAN_SCRIPT = """
import os, sys, time
from pathlib import Path
from torch.utils.data import DataLoader, IterableDataset
from catseg.app.image_stream import DieWithParent

class Forever(IterableDataset):
    def __iter__(self):
        while True:
            yield 0

class Late:
    '''The worker's start-up reaches DieWithParent only after its parent is gone.'''
    def __init__(self):
        self.start_up = DieWithParent()
    def __call__(self, worker_id):
        Path(sys.argv[1]).write_text(str(os.getpid()))
        time.sleep(1.0)
        self.start_up(worker_id)

loader = iter(DataLoader(Forever(), batch_size=None, num_workers=1, worker_init_fn=Late()))
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
os._exit(0)  # dies like a killed process: no clean-up of the loader
"""


def test_orphaned_loader_worker_exits(tmp_path):
    """A labelling process killed while its DataLoader worker starts (before the worker's prctl)
    must not leave the worker behind: PyTorch's watchdog, started after worker_init_fn, would
    take the new parent (init) for the loader and the worker would wait forever (a CI failure
    of test_label's kill test)."""
    pid_file = tmp_path / "worker.pid"
    parent = subprocess.run([sys.executable, "-c", ORPHAN_SCRIPT, str(pid_file)], timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert parent.returncode == 0
    worker = int(pid_file.read_text())

    def alive() -> bool:
        try:
            return "\tZ" not in Path(f"/proc/{worker}/status").read_text().split("State:")[1].split("\n")[0]
        except (OSError, IndexError):
            return False
    deadline = time.time() + 20
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    if alive():
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the orphaned loader worker was still running 20 s after its parent died")
