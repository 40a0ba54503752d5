"""catseg-label --video-input: a generated 30-frame video gives an overlay video of the same
frame count and size, and per-frame labels equal to those of its frames segmented as images
(the decoded frames saved as PNG, a lossless path, through OpenVocabPredictor.segment_many
with the same model, batch size and thread count); a truncated video keeps the frames done and
says so in one line; an unreadable one is one `error:` line."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from catseg.app.predictor import OpenVocabPredictor
from catseg.config import load_config, shipped_config

REPO = Path(__file__).resolve().parents[1]
VOCAB = "sky; grass; sea"
FRAMES, SIZE = 30, (64, 96)


def make_video(path: Path) -> None:
    h, w = SIZE
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    rng = np.random.default_rng(0)
    for i in range(FRAMES):
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        frame[: h // 3] = (220, 140, 60)  # BGR sky
        frame[40:60, i * 2:i * 2 + 24] = (0, 200, 0)  # a moving green patch
        writer.write(frame)
    writer.release()


def label_video(video: Path, out: Path, *extra):
    return subprocess.run([sys.executable, str(REPO / "demo" / "label.py"), "--video-input", str(video), "--output",
                           str(out), "--vocab", VOCAB, "--batch-size", "4", "--threads", "1", *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def decoded_frames(video: Path):
    capture = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    make_video(root / "clip.avi")
    return root / "clip.avi"


def test_video_overlay_and_frame_labels(video, tmp_path):
    out = tmp_path / "out"
    proc = label_video(video, out, "--save-frames")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{FRAMES} frames segmented" in proc.stderr and "frame/s" in proc.stderr
    overlay = decoded_frames(out / "clip_overlay.mp4")
    assert len(overlay) == FRAMES and all(f.shape[:2] == SIZE for f in overlay)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    frames = decoded_frames(video)
    assert len(frames) == FRAMES
    pngs = []
    for i, frame in enumerate(frames):
        pngs.append(tmp_path / f"frame{i:02d}.png")
        cv2.imwrite(str(pngs[-1]), frame)
    torch.manual_seed(0)  # catseg-label's model seed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = OpenVocabPredictor(load_config(str(shipped_config("tiny.yaml"))), batch_size=4)
        results = list(predictor.segment_many(pngs, ["sky", "grass", "sea"]))
    finally:
        torch.set_num_threads(threads)
    for i, result in enumerate(results):
        with Image.open(out / "clip_frames" / f"clip_{i:06d}.png") as im:
            assert np.array_equal(np.asarray(im), result.labels.numpy()), f"frame {i}"


def test_truncated_video_keeps_its_frames(video, tmp_path):
    data = video.read_bytes()
    truncated = tmp_path / "cut.avi"
    truncated.write_bytes(data[: len(data) // 2])
    kept = len(decoded_frames(truncated))
    assert 0 < kept < FRAMES
    proc = label_video(truncated, tmp_path / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING: ")]
    assert len(warnings) == 1 and "ended early" in warnings[0] and f"{kept} frames" in warnings[0]
    assert len(decoded_frames(tmp_path / "out" / "cut_overlay.mp4")) == kept


def test_unreadable_video_is_one_line(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    proc = label_video(bad, tmp_path / "out")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert "bad.mp4" in errors[0]
