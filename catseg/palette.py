"""The class palette: one RGB colour per class id, for overlays and datasets' `stuff_colors`."""
import colorsys

import numpy as np

GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def class_colors(num_classes: int) -> np.ndarray:
    """(T, 3) uint8 RGB colours, deterministic and well spread (golden-ratio hue steps)."""
    hues = (np.arange(num_classes) * GOLDEN_RATIO_CONJUGATE) % 1.0
    values = (0.95, 0.75)
    rgb = [colorsys.hsv_to_rgb(h, 0.7, values[i % 2]) for i, h in enumerate(hues)]
    return np.round(np.array(rgb, dtype=np.float64).reshape(-1, 3) * 255).astype(np.uint8)
