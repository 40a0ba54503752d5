"""catseg.image_io: every input kind and every bad input, with the message it gives."""
import numpy as np
import pytest
from PIL import Image

from catseg.image_io import ImageReadError, array_to_rgb, downscale, read_image, to_rgb

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def quadrants(w=8, h=6):
    """RGB test image: left half red, right half green, bottom-right block blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2:] = GREEN
    a[h // 2:, w // 2:] = BLUE
    return a


def test_rgb_png_roundtrip(tmp_path):
    Image.fromarray(quadrants()).save(tmp_path / "x.png")
    assert np.array_equal(read_image(tmp_path / "x.png"), quadrants())


def test_grayscale(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], gray) for c in range(3))
    assert np.array_equal(to_rgb(gray), out) and np.array_equal(to_rgb(gray[..., None]), out)


def test_rgba_composited_over_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # transparent (hidden black): white
    rgba[0, 2] = (0, 0, 255, 128)  # half-transparent blue over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert tuple(out[0, 0]) == RED
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[0, 2]) == (127, 127, 255)
    assert np.array_equal(to_rgb(rgba), out)
    bgra = rgba[..., [2, 1, 0, 3]]
    assert np.array_equal(to_rgb(bgra, format="BGR"), out)


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    out = read_image(tmp_path / "p.png")
    assert tuple(out[0, 0]) == RED and tuple(out[0, 1]) == (255, 255, 255)


def test_16bit_grayscale(tmp_path):
    g16 = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out[0, :, 0].tolist() == [0, 100, 255]  # scaled, not clipped at 255
    assert to_rgb(g16)[0, :, 1].tolist() == [0, 100, 255]


def test_16bit_rgb(tmp_path):
    import cv2

    rgb16 = quadrants().astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # cv2 writes BGR, 16 bits per channel
    assert np.array_equal(read_image(tmp_path / "c16.png"), quadrants())
    assert np.array_equal(to_rgb(rgb16), quadrants())


@pytest.mark.parametrize("ext", ["jpg", "tif"])
def test_cmyk(tmp_path, ext):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / f"c.{ext}")
    out = read_image(tmp_path / f"c.{ext}")
    assert np.abs(out.astype(int) - RED).max() <= 3


def test_exif_rotation(tmp_path):
    a = quadrants(w=8, h=6)
    image = Image.fromarray(a)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif, quality=100, subsampling=0)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (8, 6, 3)
    expected = np.rot90(a, k=-1)  # clockwise
    assert np.abs(out.astype(int) - expected).max() <= 40  # JPEG ringing at colour edges
    assert np.abs(out[-2:, :2].astype(int) - BLUE).max() <= 10  # bottom-left: the former bottom-right
    assert np.array_equal(to_rgb(Image.open(tmp_path / "r.jpg")), out)


def test_bgr_array():
    assert np.array_equal(to_rgb(quadrants()[..., ::-1], format="BGR"), quadrants())
    with pytest.raises(ValueError, match="format 'HSV'"):
        to_rgb(quadrants(), format="HSV")


def test_float_and_bool_arrays():
    assert np.array_equal(to_rgb(quadrants().astype(np.float32) / 255), quadrants())
    assert to_rgb(np.ones((2, 2), bool)).min() == 255
    with pytest.raises(ImageReadError, match=r"outside \[0, 1\]"):
        to_rgb(quadrants().astype(np.float32))


def test_one_pixel(tmp_path):
    Image.new("RGB", (1, 1), BLUE).save(tmp_path / "one.png")
    out = read_image(tmp_path / "one.png")
    assert out.shape == (1, 1, 3) and tuple(out[0, 0]) == BLUE


def test_corrupt_and_truncated(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="trunc.jpg: corrupt or truncated image"):
        read_image(tmp_path / "trunc.jpg")
    (tmp_path / "garbled.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(ImageReadError, match="garbled.png: (corrupt or truncated|not an image)"):
        read_image(tmp_path / "garbled.png")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match=r"notes.txt: not an image \(unrecognised file format\)"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)
    with pytest.raises(TypeError, match="expected a path, a PIL image or a numpy array"):
        to_rgb(42)


def test_bad_arrays():
    with pytest.raises(ImageReadError, match="expected \\(H, W\\)"):
        array_to_rgb(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ImageReadError, match="expected \\(H, W\\)"):
        array_to_rgb(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageReadError, match="unsupported pixel type int32"):
        array_to_rgb(np.full((2, 2), 300, np.int32))


def test_too_many_pixels(tmp_path, monkeypatch):
    """Past twice PIL's own limit PIL refuses first; the line still names catseg's limit and key."""
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10 000 pixels > 2 x limit
    with pytest.raises(ImageReadError, match=r"big.png: too many pixels: 10,000, over the limit of 1,000 \(INPUT"):
        read_image(tmp_path / "big.png", max_pixels=1000)


def test_downscale_and_jpeg_draft(tmp_path):
    a = np.zeros((3000, 1000, 3), np.uint8)
    assert downscale(a, 600).shape == (600, 200, 3)
    assert downscale(a, 0) is a and downscale(a, 3000) is a
    Image.fromarray(a).save(tmp_path / "tall.jpg")
    decoded = read_image(tmp_path / "tall.jpg", max_side=300)
    assert decoded.shape[:2] == (375, 125)  # 1/8 DCT scale: the longer side stays >= 300
    assert read_image(tmp_path / "tall.jpg", max_side=1000).shape[:2] == (1500, 500)
    assert read_image(tmp_path / "tall.jpg").shape[:2] == (3000, 1000)
