"""Overlay rendering: the label map blended over the image, with a legend of the classes present.

The legend is a panel right of the image: one row per class present (largest pixel share
first), a colour swatch, the name and its share. Classes that label no pixel are not listed.
The panel stays bounded whatever the vocabulary: names longer than LEGEND_CHARS characters are
cut with "...", and past LEGEND_ROWS classes a last row says how many more there are (the
JSON lists them all).
"""
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..palette import class_colors

Box = Tuple[int, int, int, int]
LEGEND_CHARS = 48  # longest name shown in full in the legend
LEGEND_ROWS = 40  # most classes listed in the legend


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
    more = len(present) - LEGEND_ROWS
    present = list(present[:LEGEND_ROWS - 1] if more > 0 else present)
    texts = [f"{short_name(classes[i])}  {shares[i]:.1%}" for i in present]
    texts += [f"+{more + 1} more"] if more > 0 else []
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(measure.textlength(t, font=font)) for t in texts), default=0)
    pad = row // 2
    panel_w = pad * 3 + row + text_w
    canvas = Image.new("RGB", (w + panel_w, max(h, pad * 2 + row * len(texts))), (255, 255, 255))
    canvas.paste(Image.fromarray(blend(image, labels, colors, alpha)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    legend = []
    for k, text in enumerate(texts):
        y = pad + k * row
        if k < len(present):
            box = (w + pad, y + 2, w + pad + row - 4, y + row - 2)
            draw.rectangle(box, fill=tuple(int(c) for c in colors[present[k]]))
            legend.append((present[k], box))
        draw.text((w + pad * 2 + row, y + row // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas, legend


def short_name(name: str) -> str:
    """`name`, cut to LEGEND_CHARS characters with "..." when longer."""
    return name if len(name) <= LEGEND_CHARS else name[:LEGEND_CHARS - 3] + "..."
