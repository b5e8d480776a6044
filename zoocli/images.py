"""Load an image file as an RGB ``PIL.Image``, or fail with one clear line naming the file.

Everything a user may point the CLI at is handled here, so adapters only ever see RGB images of
their original size: grayscale, RGBA / LA (composited on white), palette images with or without
transparency, 16-bit and 32-bit integer / float images (scaled to 8 bits), CMYK, and EXIF-rotated
photos (turned upright). Missing files, directories, non-images, truncated or corrupt files and
decompression bombs raise ``ZooError``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zoocli.errors import ZooError

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: larger files are refused as likely decompression bombs


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at ``path`` as an upright RGB image; ``ZooError`` (one line) on any failure."""
    p = Path(path)
    if not p.exists():
        raise ZooError(f"image '{p}' does not exist")
    if p.is_dir():
        raise ZooError(f"image '{p}' is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            im = Image.open(p)
            w, h = im.size
            if w * h > max_pixels:
                raise ZooError(
                    f"image '{p}' is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                    "(possible decompression bomb)"
                )
            im.load()  # decode now: truncated / corrupt data fails here, not later in the processor
    except ZooError:
        raise
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit, raised by open()
        raise ZooError(f"image '{p}' is too large (possible decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise ZooError(f"'{p}' is not an image file Pillow can read") from None
    except PermissionError:
        raise ZooError(f"image '{p}' cannot be read (permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ZooError(f"image '{p}' is truncated or corrupt: {_one_line(e)}") from None
    try:
        im = ImageOps.exif_transpose(im) or im
        return to_rgb(im)
    except (OSError, ValueError) as e:
        raise ZooError(f"image '{p}' cannot be converted to RGB: {_one_line(e)}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB version of ``im``: transparency composited on white, high bit depths scaled to 8 bits."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode.startswith("F"):  # I, I;16, I;16B, I;16L, I;16N, F
        return Image.fromarray(_to_uint8(np.asarray(im), mode), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info or mode in ("PA", "LA", "La", "RGBa", "RGBA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel integer / float array to uint8."""
    a = a.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535 and a.max() > 255):
        a = a / 257.0  # 16-bit full range -> 8-bit full range (65535 -> 255)
    elif mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    elif a.size and (a.min() < 0 or a.max() > 255):
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
