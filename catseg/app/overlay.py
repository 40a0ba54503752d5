"""Overlay rendering: the label map blended over the image, with a legend of the classes present.

The legend is a panel right of the image: one row per class present (largest pixel share
first), a colour swatch, the name and its share. Classes that label no pixel are not listed.
"""
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..palette import class_colors

Box = Tuple[int, int, int, int]


def blend(image: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(h, w, 3) uint8 image, (h, w) ids, (T, 3) colours -> (h, w, 3) uint8 overlay."""
    mixed = image.astype(np.float32) * (1 - alpha) + colors[labels].astype(np.float32) * alpha
    return np.round(mixed).astype(np.uint8)


def render_overlay(image: np.ndarray, labels: np.ndarray, classes: Sequence[str], present: Sequence[int],
                   shares: Sequence[float], alpha: float = 0.55) -> Tuple[Image.Image, List[Tuple[int, Box]]]:
    """Overlay with a legend.

    Args:
        image: (h, w, 3) uint8 RGB; labels: (h, w) class ids; classes: the T names;
        present: ids to list, in order; shares: (T,) pixel share per class.
    Returns:
        the RGB overlay image (w + legend width, max(h, legend height)) and the legend as
        [(class id, swatch box (x0, y0, x1, y1) in the returned image)].
    """
    h, w = labels.shape
    colors = class_colors(len(classes))
    row = max(14, min(28, max(h, w) // 30))
    font = ImageFont.load_default(size=row - 4)
    texts = [f"{classes[i]}  {shares[i]:.1%}" for i in present]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(measure.textlength(t, font=font)) for t in texts), default=0)
    pad = row // 2
    panel_w = pad * 3 + row + text_w
    canvas = Image.new("RGB", (w + panel_w, max(h, pad * 2 + row * len(present))), (255, 255, 255))
    canvas.paste(Image.fromarray(blend(image, labels, colors, alpha)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    legend = []
    for k, (i, text) in enumerate(zip(present, texts)):
        y = pad + k * row
        box = (w + pad, y + 2, w + pad + row - 4, y + row - 2)
        draw.rectangle(box, fill=tuple(int(c) for c in colors[i]))
        draw.text((w + pad * 2 + row, y + row // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
        legend.append((i, box))
    return canvas, legend
