"""Heavy and unusual image files (catseg.image_io): decompression bombs are refused from their
header under an address-space cap; animated, multi-page, 16-bit, float and HEIC files each
get the behaviour the README's "Limits and safety" table lists."""
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from catseg.image_io import ImageReadError, read_image

REPO = Path(__file__).resolve().parents[1]
BOMB_SIDE = 40000  # 1.6 Gpixel: 4.8 GB as RGB


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid PNG header declaring side x side RGB pixels, with a few kB of zeros as data
    (zlib turns them into whole rows of black: decoding would need side^2 x 3 bytes)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * side) * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def jpeg_bomb(side: int = BOMB_SIDE) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to declare side x side pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)  # height, width
    return bytes(data)


BOMB_CHILD = r"""
import resource, sys
from pathlib import Path
from catseg.image_io import ImageReadError, read_image
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
cap = vm_bytes() + 300 * 2**20  # what is mapped now, plus 300 MB: far below one decoded bomb (4.8 GB)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
for name in sys.argv[1:]:
    try:
        read_image(name)
        print("DECODED", name)
    except ImageReadError as e:
        print("REFUSED", e)
    except MemoryError:
        print("MEMORY", name)
"""


def test_bombs_refused_before_decoding_under_address_space_cap(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    (tmp_path / "bomb.jpg").write_bytes(jpeg_bomb())
    assert max(f.stat().st_size for f in tmp_path.iterdir()) < 200_000  # small files
    proc = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(tmp_path / "bomb.png"), str(tmp_path / "bomb.jpg")],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("REFUSED") for line in lines), proc.stdout
    for line, name in zip(lines, ("bomb.png", "bomb.jpg")):
        assert name in line and "1,600,000,000, over the limit of 100,000,000" in line, line
        assert "(INPUT.MAX_IMAGE_PIXELS raises it)" in line
        assert "\n" not in line


def test_bomb_check_is_the_cap_not_the_decoder(tmp_path):
    """Without the limit the same child decodes a 3000x3000 PNG fine: the cap leaves room for real
    images, so the refusal above comes from the header check."""
    Image.new("RGB", (3000, 3000), (1, 2, 3)).save(tmp_path / "fine.png")
    proc = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(tmp_path / "fine.png")], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.startswith("DECODED"), proc.stdout + proc.stderr[-2000:]


def test_pixel_limit_is_configurable(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "x.png")
    with pytest.raises(ImageReadError, match=r"x.png: too many pixels: 300x200 = 60,000, over the limit of "
                                             r"59,999 \(INPUT.MAX_IMAGE_PIXELS raises it\)"):
        read_image(tmp_path / "x.png", max_pixels=59_999)
    assert read_image(tmp_path / "x.png", max_pixels=60_000).shape == (200, 300, 3)
    assert read_image(tmp_path / "x.png", max_pixels=0).shape == (200, 300, 3)


def test_predictor_reads_the_key(tmp_path):
    from catseg import OpenVocabPredictor

    Image.new("RGB", (64, 48)).save(tmp_path / "x.png")
    predictor = OpenVocabPredictor("configs/tiny.yaml", opts=["INPUT.MAX_IMAGE_PIXELS", "3000"])
    with pytest.raises(ImageReadError, match=r"64x48 = 3,072, over the limit of 3,000 \(INPUT.MAX_IMAGE_PIXELS"):
        predictor.prepare(tmp_path / "x.png")


def frames(colors, size=(8, 6)):
    return [Image.new("RGB", size, c) for c in colors]


@pytest.mark.parametrize("ext", ["gif", "png", "webp"])
def test_animated_first_frame(tmp_path, ext):
    if ext == "webp" and not features.check("webp"):
        pytest.fail("this Pillow lacks WebP")
    first, *rest = frames([(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    first.save(tmp_path / f"a.{ext}", save_all=True, append_images=rest, duration=100, loop=0,
               **({"lossless": True} if ext == "webp" else {}))
    with Image.open(tmp_path / f"a.{ext}") as im:
        assert getattr(im, "n_frames", 1) == 3
    out = read_image(tmp_path / f"a.{ext}")
    assert out.shape == (6, 8, 3) and np.abs(out.astype(int) - (255, 0, 0)).max() <= 2


def test_multipage_tiff_first_page(tmp_path):
    first, second = frames([(0, 255, 0), (255, 0, 0)])
    first.save(tmp_path / "m.tif", save_all=True, append_images=[second])
    assert read_image(tmp_path / "m.tif")[0, 0].tolist() == [0, 255, 0]


def test_16bit_tiff_scaled(tmp_path):
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(tmp_path / "g16.tif")
    assert read_image(tmp_path / "g16.tif")[0, :, 0].tolist() == [0, 100, 255]


def test_float_tiff_unit_range_scaled_else_clipped(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "unit.tif")
    assert read_image(tmp_path / "unit.tif")[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[-3.0, 100.0, 300.0, np.nan]], np.float32)).save(tmp_path / "wide.tif")
    assert read_image(tmp_path / "wide.tif")[0, :, 0].tolist() == [0, 100, 255, 0]


def test_heic_named_in_one_line(tmp_path):
    """An HEIC file (ISO box 'ftypheic'): one line naming the format, not a traceback."""
    (tmp_path / "photo.heic").write_bytes(struct.pack(">I", 24) + b"ftypheic" + b"\x00" * 4 + b"mif1heic" + b"\0" * 64)
    with pytest.raises(ImageReadError, match=r"photo.heic: not an image this Pillow can read \(HEIC"):
        read_image(tmp_path / "photo.heic")
