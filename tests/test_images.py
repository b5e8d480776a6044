"""zoocli.images.load_image: every image a user may pass becomes an upright RGB image, every bad file a
one-line ZooError naming the file. Images are generated with Pillow in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zoocli.errors import ZooError
from zoocli.images import load_image


def _px(im, xy=(0, 0)):
    return im.getpixel(xy)


def test_rgb_png_and_jpeg(tmp_path):
    Image.new("RGB", (7, 5), (10, 20, 30)).save(tmp_path / "a.png")
    im = load_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.size == (7, 5) and _px(im) == (10, 20, 30)
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "a.jpg", quality=95)
    im = load_image(str(tmp_path / "a.jpg"))
    assert im.mode == "RGB" and max(abs(a - b) for a, b in zip(_px(im), (200, 100, 50))) < 6


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    assert _px(load_image(tmp_path / "g.png")) == (77, 77, 77)
    Image.new("1", (4, 4), 1).save(tmp_path / "b.png")
    assert _px(load_image(tmp_path / "b.png")) == (255, 255, 255)


def test_rgba_and_la_composited_on_white(tmp_path):
    im = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    assert out.mode == "RGB" and _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (255, 0, 0)
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert _px(load_image(tmp_path / "la.png")) == (255, 255, 255)
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    half.save(tmp_path / "half.png")
    assert _px(load_image(tmp_path / "half.png"))[0] in (127, 128)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out.mode == "RGB" and _px(out, (0, 0)) == (0, 0, 255) and _px(out, (1, 0)) == (0, 255, 0)
    p.save(tmp_path / "pt.png", transparency=0)
    out = load_image(tmp_path / "pt.png")
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (0, 255, 0)
    p.save(tmp_path / "pt.gif", transparency=0)
    assert _px(load_image(tmp_path / "pt.gif"), (0, 0)) == (255, 255, 255)


def test_16_bit_scaled_to_8_bit(tmp_path):
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")  # 16-bit grayscale PNG (opens as I;16 or I)
    out = load_image(tmp_path / "d.png")
    assert out.mode == "RGB" and [_px(out, (i, 0))[0] for i in range(3)] == [0, 100, 255]
    Image.fromarray(a).save(tmp_path / "d.tif")
    out = load_image(tmp_path / "d.tif")
    assert [_px(out, (i, 0))[0] for i in range(3)] == [0, 100, 255]


def test_float_image(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    out = load_image(tmp_path / "f.tif")
    assert [_px(out, (i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_cmyk(tmp_path):
    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = _px(load_image(tmp_path / "c.jpg"))
    assert r > 200 and g < 60 and b < 60


def test_exif_rotation(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white left strip
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)  # upright
    assert _px(out, (10, 2))[0] > 200 and _px(out, (10, 37))[0] < 50  # strip is now on top


def _one_line_error(path, match, **kw):
    with pytest.raises(ZooError) as info:
        load_image(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg
    return msg


def test_missing_and_directory(tmp_path):
    _one_line_error(tmp_path / "nope.png", "does not exist")
    _one_line_error(tmp_path, "is a directory")


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_text("hello, I am text\n")
    _one_line_error(tmp_path / "x.png", "not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _one_line_error(tmp_path / "empty.jpg", "not an image")


def test_truncated_and_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "cut.png", "truncated or corrupt")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    _one_line_error(tmp_path / "cut.jpg", "truncated or corrupt")


def test_decompression_bomb(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    _one_line_error(tmp_path / "big.png", "decompression bomb", max_pixels=10_000)
    assert load_image(tmp_path / "big.png", max_pixels=90_000).size == (300, 300)


# --------------------------------------------------------------------------- hostile files (issue 11)


def test_eps_named_jpg_never_reaches_ghostscript(tmp_path):
    from zoocli.images import FORMATS

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n%%EOF\n"
    (tmp_path / "x.jpg").write_bytes(eps)
    with pytest.raises(ZooError, match=r"not an image file zoo reads \(JPEG, PNG, WEBP, BMP, GIF, TIFF\)"):
        load_image(tmp_path / "x.jpg")
    assert "EPS" not in FORMATS
    # another decoder outside the list (TGA, which Pillow would otherwise pick by content) is refused too
    Image.new("RGB", (4, 4)).save(tmp_path / "t.tga")
    (tmp_path / "t.png").write_bytes((tmp_path / "t.tga").read_bytes())
    with pytest.raises(ZooError, match="not an image file zoo reads"):
        load_image(tmp_path / "t.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_supported_format_loads(tmp_path, fmt):
    Image.new("RGB", (6, 4), (1, 2, 3)).save(tmp_path / "a.img", format=fmt)
    assert load_image(tmp_path / "a.img").size == (6, 4)


def test_fifo_named_jpg_is_refused_at_once(tmp_path):
    import os

    p = tmp_path / "f.jpg"
    os.mkfifo(p)  # opening it would block forever: it must never be opened
    with pytest.raises(ZooError, match="not a regular file"):
        load_image(p)
    long_name = tmp_path / ("x" * 10_000 + ".jpg")
    with pytest.raises(ZooError, match="cannot be opened .*File name too long") as e:
        load_image(long_name)
    assert len(str(e.value)) < 400
