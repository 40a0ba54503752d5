"""Video input of `catseg-label --video-input clip.mp4 --output out/ [--save-frames]`.

The video is read frame by frame with OpenCV (its FFmpeg build), `--batch-size` frames at a
time, so memory does not grow with its length. It writes

    out/<stem>_overlay.mp4              the labels blended over every frame (same size, frame rate
                                        and frame count; MPEG-4 Part 2, "mp4v")
    out/<stem>_frames/<stem>_NNNNNN.png with --save-frames: each frame's label map (uint8, uint16
                                        above 255 classes), NNNNNN the 0-based frame number
    out/classes.json                    the class list (label value i = class i)

The text embeddings are computed once, before the first frame; a progress bar shows frames/s.
The overlay video is written under a temporary name and renamed when the frames are done: an
unreadable video is one `error:` line, a truncated one (fewer frames than its header
announces, or a decoding error) one WARNING line, its frames already segmented kept.
"""
import os
import sys
from functools import partial
from pathlib import Path
from typing import Iterator, List, Optional

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..atomic import atomic_write
from ..errors import CatsegError
from ..palette import class_colors
from .label_folder import label_dtype, write_json
from .overlay import blend

DEFAULT_FPS = 25.0
FOURCC = "mp4v"


class VideoReadError(CatsegError):
    """A video file that cannot be opened or decoded at all."""


def read_frames(capture: cv2.VideoCapture, batch_size: int, problems: List[str]) -> Iterator[List[np.ndarray]]:
    """Batches of (h, w, 3) uint8 RGB frames; a decoding error ends the stream and is appended
    to `problems`."""
    batch = []
    while True:
        try:
            ok, frame = capture.read()
        except cv2.error as e:
            problems.append(" ".join(str(e).split()))
            ok = False
        if not ok:
            break
        batch.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def open_video(path: Path) -> cv2.VideoCapture:
    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoReadError(f"{path}: not a video OpenCV can read")
    return capture


def label_video(args, cfg, vocabulary: Optional[List[str]], out: Path) -> int:
    """Segment `args.video_input` with the model of `cfg`; see the module docstring. Returns
    the exit status: 0, or 1 when the video ended early."""
    from .label import MODEL_SEED
    from .predictor import OpenVocabPredictor

    path = Path(args.video_input)
    capture = open_video(path)
    expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    torch.manual_seed(MODEL_SEED)  # random weights (no MODEL.WEIGHTS) as in catseg-label's image mode
    predictor = OpenVocabPredictor(cfg, batch_size=args.batch_size, output="labels", topk=1)  # labels only
    classes = predictor.set_vocabulary(vocabulary if vocabulary is not None else predictor.classes)
    write_json(out / "classes.json", classes)
    colors, dtype = class_colors(len(classes)), label_dtype(len(classes))
    frames_dir = out / f"{path.stem}_frames"
    if args.save_frames:
        frames_dir.mkdir(exist_ok=True)
    target = out / f"{path.stem}_overlay.mp4"
    tmp = out / f".{path.stem}_overlay.{os.getpid()}.tmp.mp4"
    writer, done, problems = None, 0, []
    try:
        with tqdm(total=expected or None, unit="frame", file=sys.stderr, dynamic_ncols=True) as bar:
            for frames in read_frames(capture, args.batch_size, problems):
                results = predictor.run([predictor.prepare(f) for f in frames])
                for frame, result in zip(frames, results):
                    labels = result.labels.numpy()
                    if writer is None:
                        writer = open_writer(tmp, fps, frame.shape[1], frame.shape[0])
                    overlay = blend(result.image, labels, colors)
                    if overlay.shape[:2] != frame.shape[:2]:  # frames above TEST.MAX_INPUT_SIDE
                        overlay = cv2.resize(overlay, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_NEAREST)
                    writer.write(cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
                    if args.save_frames:
                        image = Image.fromarray(labels.astype(dtype))
                        atomic_write(frames_dir / f"{path.stem}_{done:06d}.png", partial(image.save, format="PNG"))
                    done += 1
                    bar.update(1)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
            os.replace(tmp, target)
    if done == 0:
        raise VideoReadError(f"{path}: no frame could be decoded{': ' + problems[0] if problems else ''}")
    short = expected > 0 and done < expected
    if problems or short:
        reason = problems[0] if problems else f"{done} of the {expected} frames its header announces"
        print(f"WARNING: {path}: video ended early ({reason}); the {done} frames segmented are kept in {target}",
              file=sys.stderr)
    print(f"{done} frames segmented into {target}" + (f" and {frames_dir}" if args.save_frames else ""),
          file=sys.stderr)
    return 1 if problems or short else 0


def open_writer(path: Path, fps: float, width: int, height: int) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC), fps, (width, height))
    if not writer.isOpened():
        raise CatsegError(f"cannot write video {path} (OpenCV has no {FOURCC} encoder)")
    return writer
