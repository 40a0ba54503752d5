"""Robust image input: files, PIL images and numpy arrays -> (H, W, 3) uint8 RGB arrays.

Conversions (each tested in tests/test_image_io.py):
- EXIF orientation is applied (as detectron2's `read_image`), for files and PIL images;
- grayscale / 1-bit / palette / CMYK / YCbCr are converted to RGB; 16-bit images (PIL modes
  "I;16*" and "I", numpy uint16) are scaled by 255 / 65535;
- an alpha channel (RGBA, LA, palette transparency, numpy (H, W, 4)) is composited over white;
- numpy arrays are RGB unless `format="BGR"`; float arrays must lie in [0, 1].
Failures raise `ImageReadError` whose message names the input and the reason: missing file,
not an image, corrupt or truncated data, too many pixels, empty or badly shaped array.

Size limit (decompression bombs): a file whose header declares more than `max_pixels` pixels
(the predictor passes INPUT.MAX_IMAGE_PIXELS, default 100 Mpixel) is refused from its header,
before any pixel is decoded, with one line naming the limit and that key. JPEGs larger than
twice `max_side` are decoded at a reduced DCT scale; `downscale` then bounds the longer side.

Formats beyond single-frame 8-bit images (tests/test_image_io.py):
- animated GIF / WebP / PNG and multi-page TIFF: the first frame (page);
- 16-bit (PIL "I;16*", "I") images: scaled by 255 / 65535; float ("F") images: taken as [0, 1]
  (scaled by 255) when every value lies in [0, 1], else as 0-255 (clipped); NaN -> 0;
- HEIC / HEIF / AVIF that this Pillow cannot decode, and any other unknown format: one line
  `not an image (...)` naming the format when it is recognised.
"""
import math
import re
import warnings
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
DEFAULT_MAX_PIXELS = 100_000_000  # INPUT.MAX_IMAGE_PIXELS's default (catseg/config/keys.py)
MAX_PIXELS_KEY = "INPUT.MAX_IMAGE_PIXELS"
# ISO base-media brands (bytes 8-12 after "ftyp") of the HEIF family
HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
               b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}

# Past PIL's own limit but within INPUT.MAX_IMAGE_PIXELS: ours decides, PIL's warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255
        gray = np.round(values.clip(0, 255)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.has_transparency_data:
        return composite_over_white(np.array(image.convert("RGBA")))
    return np.array(image.convert("RGB"))


def read_image(path: Union[str, Path], max_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file -> (H, W, 3) uint8 RGB. `max_side` > 0 lets JPEGs decode at a
    reduced DCT scale (1/2, 1/4, 1/8) whose longer side stays >= `max_side` (other formats:
    no effect). More than `max_pixels` pixels (0: no limit) -> ImageReadError before decoding."""
    return read_image_and_size(path, max_side, max_pixels)[0]


def pixel_limit_message(pixels: int, max_pixels: int, size: str = "") -> str:
    """'too many pixels: 40000x40000 = 1,600,000,000, over the limit of 100,000,000 (INPUT.MAX_IMAGE_PIXELS ...)'."""
    return (f"too many pixels: {size + ' = ' if size else ''}{pixels:,}, over the limit of {max_pixels:,} "
            f"({MAX_PIXELS_KEY} raises it); refused before decoding")


def allow_pixels(max_pixels: int) -> None:
    """Let PIL's own decompression-bomb check (an error past 2 x `Image.MAX_IMAGE_PIXELS`) admit
    `max_pixels` (0: any): ours is the limit that counts. Only ever raises PIL's limit."""
    if Image.MAX_IMAGE_PIXELS is not None and (not max_pixels or max_pixels > Image.MAX_IMAGE_PIXELS):
        Image.MAX_IMAGE_PIXELS = max_pixels or None


def bomb_pixels(error: Exception) -> int:
    """The pixel count in PIL's DecompressionBombError message (0 if absent)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return int(found.group(1)) if found else 0


def unreadable_format(path: Path) -> str:
    """'HEIC' (etc.) when the file's header is of a format family Pillow may lack, else ''."""
    with open(path, "rb") as f:
        head = f.read(12)
    return HEIF_BRANDS.get(head[8:12], "") if head[4:8] == b"ftyp" else ""


def read_image_and_size(path: Union[str, Path], max_side: int = 0,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[np.ndarray, Tuple[int, int]]:
    """`read_image`, and the (H, W) of the full-size image after EXIF rotation."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    allow_pixels(max_pixels)
    try:
        with Image.open(path) as image:  # reads the header only
            w, h = image.size
            if max_pixels and w * h > max_pixels:
                raise ImageReadError(f"{path}: {pixel_limit_message(w * h, max_pixels, f'{w}x{h}')}")
            image.seek(0)  # animated / multi-page files: the first frame
            if image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSING_ORIENTATIONS:
                w, h = h, w
            if max_side and max(image.size) > max_side:
                scale = max_side / max(image.size)
                image.draft(None, (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
            image.load()
            return pil_to_rgb(image), (h, w)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:  # past twice PIL's limit, which may exceed ours
        limit = max_pixels or Image.MAX_IMAGE_PIXELS or 0
        raise ImageReadError(f"{path}: {pixel_limit_message(bomb_pixels(e), limit)}") from None
    except UnidentifiedImageError:
        family = unreadable_format(path)
        if family:
            raise ImageReadError(f"{path}: not an image this Pillow can read ({family}: convert it to PNG or JPEG, "
                                 "or install a Pillow plugin for it)") from None
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


def to_rgb(image: ImageInput, format: str = "RGB", max_side: int = 0,
           max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A file path, PIL image or numpy array (channels in `format` order) -> (H, W, 3) uint8 RGB."""
    return load_image(image, format, max_side, max_pixels)[0]


def load_image(image: ImageInput, format: str = "RGB", max_side: int = 0,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Any input -> ((h, w, 3) uint8 RGB with longer side <= `max_side` (0: any), (H, W) of the
    full-size input after EXIF rotation). Files and PIL images over `max_pixels` pixels (0: no
    limit) are refused before decoding; arrays are already decoded."""
    if isinstance(image, (str, Path)):
        rgb, size = read_image_and_size(image, max_side, max_pixels)
    elif isinstance(image, Image.Image):
        if max_pixels and image.width * image.height > max_pixels:
            size = f"{image.width}x{image.height}"
            raise ImageReadError(f"PIL image: {pixel_limit_message(image.width * image.height, max_pixels, size)}")
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
