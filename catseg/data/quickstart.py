"""Deterministic synthetic semantic-segmentation dataset for the quick-start (no download).

Each image is a muted, textured background (smooth two-colour gradient plus noise, sometimes
faint stripes) with 1-4 coloured objects, each a class with its own shape, colour and
texture; later objects occlude earlier ones. Every pixel is labelled (0 = background).
Images and labels depend only on (seed, split, index), so the same command always writes the
same files.

Layout (the custom-dataset layout of catseg.data.datasets.register_custom_dataset):
  OUT/classes.json
  OUT/images/{train,val}/NNNN.png   RGB
  OUT/labels/{train,val}/NNNN.png   8-bit class ids

  python -m catseg.data.quickstart --out datasets/quickstart
"""
import argparse
import json
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
from PIL import Image

CLASSES = ["background", "red disk", "green square", "blue triangle", "yellow striped box", "purple ring"]
BASE_COLORS = {1: (220, 40, 40), 2: (40, 190, 60), 3: (40, 70, 225), 4: (235, 215, 40), 5: (150, 50, 190)}
SPLITS = {"train": 240, "val": 48}
SPLIT_SEEDS = {"train": 1, "val": 2}


def _disk(yy, xx, cy, cx, r):
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def _square(yy, xx, cy, cx, r):
    return (np.abs(yy - cy) <= r * 0.8) & (np.abs(xx - cx) <= r * 0.8)


def _triangle(yy, xx, cy, cx, r):
    # apex up: inside when below the apex and within the widening sides
    top, bottom = cy - r, cy + r * 0.8
    half_width = (yy - top) / (bottom - top) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


def _box(yy, xx, cy, cx, r):
    return (np.abs(yy - cy) <= r * 0.6) & (np.abs(xx - cx) <= r)


def _ring(yy, xx, cy, cx, r):
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)


SHAPES: Dict[int, Callable] = {1: _disk, 2: _square, 3: _triangle, 4: _box, 5: _ring}


def background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """(size, size, 3) float muted background: gradient between two greyish colours + texture."""
    grey = rng.uniform(50, 190, size=2)
    colors = grey[:, None] + rng.uniform(-25, 25, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = colors[0] * (1 - t[..., None]) + colors[1] * t[..., None]
    if rng.rand() < 0.4:  # faint stripes
        period = rng.uniform(6, 20)
        img += 12 * np.sin(2 * np.pi * (xx * np.cos(angle + 1) + yy * np.sin(angle + 1)) * size / period)[..., None]
    return img + rng.normal(0, 8, size=img.shape)


def paint_object(img: np.ndarray, label: np.ndarray, cls: int, rng: np.random.RandomState) -> None:
    """Draw one object of class `cls` in place (image and label)."""
    size = img.shape[0]
    r = rng.uniform(0.12, 0.3) * size
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    mask = SHAPES[cls](yy, xx, cy, cx, r)
    color = np.array(BASE_COLORS[cls], dtype=np.float64) + rng.uniform(-25, 25, size=3)
    fill = np.broadcast_to(color, img.shape).copy()
    if cls == 4:  # dark stripes across the box
        period = rng.uniform(5, 9)
        stripes = (np.floor((xx + yy) / period) % 2 == 0)
        fill[stripes] *= 0.35
    fill += rng.normal(0, 6, size=img.shape)
    img[mask] = fill[mask]
    label[mask] = cls


def make_sample(seed: int, split: str, index: int, size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 image and (size, size) uint8 label of sample `index` of `split`."""
    rng = np.random.RandomState([seed, SPLIT_SEEDS[split], index])
    img = background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    for cls in rng.randint(1, len(CLASSES), size=rng.randint(1, 5)):
        paint_object(img, label, int(cls), rng)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def generate(out: str, seed: int = 0, size: int = 128, counts: Dict[str, int] = None) -> Path:
    """Write the dataset under `out` (existing files are overwritten with identical content)."""
    out = Path(out)
    counts = counts or SPLITS
    for split, n in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label = make_sample(seed, split, i, size)
            Image.fromarray(img).save(out / "images" / split / f"{i:04d}.png")
            Image.fromarray(label).save(out / "labels" / split / f"{i:04d}.png")
    (out / "classes.json").write_text(json.dumps(CLASSES, indent=1))
    return out


def is_generated(out: str, counts: Dict[str, int] = None) -> bool:
    """Whether `out` already holds the class list and every image and label."""
    out = Path(out)
    counts = counts or SPLITS
    return (out / "classes.json").is_file() and all(
        (out / kind / split / f"{n - 1:04d}.png").is_file()
        for split, n in counts.items() for kind in ("images", "labels"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="datasets/quickstart", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = parser.parse_args(argv)
    out = generate(args.out, args.seed, args.size)
    print(f"quick-start dataset written to {out} ({', '.join(f'{k}: {v}' for k, v in SPLITS.items())} images, "
          f"{len(CLASSES)} classes)")


if __name__ == "__main__":
    main()
