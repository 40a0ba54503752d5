"""Robust image input: files, PIL images and numpy arrays -> (H, W, 3) uint8 RGB arrays.

Conversions (each tested in tests/test_image_io.py):
- EXIF orientation is applied (as detectron2's `read_image`), for files and PIL images;
- grayscale / 1-bit / palette / CMYK / YCbCr are converted to RGB; 16-bit images (PIL modes
  "I;16*" and "I", numpy uint16) are scaled by 255 / 65535;
- an alpha channel (RGBA, LA, palette transparency, numpy (H, W, 4)) is composited over white;
- numpy arrays are RGB unless `format="BGR"`; float arrays must lie in [0, 1].
Failures raise `ImageReadError` whose message names the input and the reason: missing file,
not an image, corrupt or truncated data, too many pixels, empty or badly shaped array.

Size limit: files over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS` x 2,
about 179 Mpixel by default) are refused before decoding. JPEGs larger than twice `max_side`
are decoded at a reduced DCT scale; `downscale` then bounds the longer side.
"""
import math
from pathlib import Path
from typing import Tuple, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, Path, Image.Image, np.ndarray]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif")

WHITE = 255
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageReadError(ValueError):
    """An input that cannot be turned into an image; the message says which and why."""


def composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA -> (H, W, 3) uint8 RGB, alpha-blended over a white background."""
    alpha = rgba[..., 3:].astype(np.float32) / 255
    rgb = rgba[..., :3].astype(np.float32) * alpha + WHITE * (1 - alpha)
    return np.round(rgb).astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 RGB, EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit ("I;16", "I;16B", ...) or 32-bit integer holding 16-bit data
        gray = np.asarray(image).astype(np.float64).clip(0, 65535) * (255 / 65535)
        return np.repeat(np.round(gray).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.round(np.nan_to_num(np.asarray(image, dtype=np.float64)).clip(0, 255)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.has_transparency_data:
        return composite_over_white(np.array(image.convert("RGBA")))
    return np.array(image.convert("RGB"))


def read_image(path: Union[str, Path], max_side: int = 0) -> np.ndarray:
    """Read an image file -> (H, W, 3) uint8 RGB. `max_side` > 0 lets JPEGs decode at a
    reduced DCT scale (1/2, 1/4, 1/8) whose longer side stays >= `max_side` (other formats:
    no effect)."""
    return read_image_and_size(path, max_side)[0]


def read_image_and_size(path: Union[str, Path], max_side: int = 0) -> Tuple[np.ndarray, Tuple[int, int]]:
    """`read_image`, and the (H, W) of the full-size image after EXIF rotation."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    try:
        with Image.open(path) as image:
            w, h = image.size
            if image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSING_ORIENTATIONS:
                w, h = h, w
            if max_side and max(image.size) > max_side:
                scale = max_side / max(image.size)
                image.draft(None, (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
            image.load()
            return pil_to_rgb(image), (h, w)
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image (unrecognised file format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"{path}: corrupt or truncated image ({e})") from None


def array_to_rgb(array: np.ndarray, format: str = "RGB") -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, channels in `format` order ("RGB" or
    "BGR"; a 4th channel is alpha) -> (H, W, 3) uint8 RGB.

    uint8 is taken as 0-255, uint16 as 0-65535, bool as 0/1, floats must lie in [0, 1], other
    integer types must lie in [0, 255].
    """
    if format not in ("RGB", "BGR"):
        raise ValueError(f"format {format!r}: expected 'RGB' or 'BGR'")
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageReadError(f"array of shape {np.shape(array)}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    a = to_uint8(a)
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if format == "BGR":
        a = a[..., [2, 1, 0, 3][:a.shape[2]]]
    return composite_over_white(a) if a.shape[2] == 4 else np.ascontiguousarray(a)


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Pixel values -> uint8 by dtype (see `array_to_rgb`)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return np.round(a * (255 / 65535)).astype(np.uint8)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ImageReadError(f"float image with values outside [0, 1] (dtype {a.dtype}): "
                                 "scale it to [0, 1] or convert 0-255 data to uint8")
        return np.round(a * 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255:
        return a.astype(np.uint8)
    raise ImageReadError(f"unsupported pixel type {a.dtype} (use uint8, uint16, bool, or floats in [0, 1])")


def to_rgb(image: ImageInput, format: str = "RGB", max_side: int = 0) -> np.ndarray:
    """A file path, PIL image or numpy array (channels in `format` order) -> (H, W, 3) uint8 RGB."""
    return load_image(image, format, max_side)[0]


def load_image(image: ImageInput, format: str = "RGB", max_side: int = 0) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Any input -> ((h, w, 3) uint8 RGB with longer side <= `max_side` (0: any), (H, W) of the
    full-size input after EXIF rotation)."""
    if isinstance(image, (str, Path)):
        rgb, size = read_image_and_size(image, max_side)
    elif isinstance(image, Image.Image):
        rgb = pil_to_rgb(image)
        size = rgb.shape[:2]
    elif isinstance(image, np.ndarray):
        rgb = array_to_rgb(image, format)
        size = rgb.shape[:2]
    else:
        raise TypeError(f"image of type {type(image).__name__}: expected a path, a PIL image or a numpy array")
    return downscale(rgb, max_side), tuple(size)


def downscale(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) -> the same image with its longer side at most `max_side` (area resampling,
    aspect kept); unchanged when already small enough or `max_side` is 0."""
    h, w = rgb.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
