"""Load an image file as an RGB ``PIL.Image``, or fail with one clear line naming the file.

Everything a user may point the CLI at is handled here, so adapters only ever see RGB images of
their original size: grayscale, RGBA / LA (composited on white), palette images with or without
transparency, 16-bit and 32-bit integer / float images (scaled to 8 bits), CMYK, and EXIF-rotated
photos (turned upright). Missing files, directories, non-images, truncated or corrupt files and
decompression bombs raise ``ZooError``.

Only regular files are opened (a FIFO, device or socket named ``f.jpg`` is refused from its
``os.stat``, never opened, so it cannot hang; the opened descriptor is checked again), and with
``root`` (``zoo eval``'s image folder) only files inside it: the file actually opened must be the
one its real path names inside ``root``, so a symlink swapped after the data file was checked is
refused too. Only the formats of ``FORMATS`` are decoded: Pillow
picks the decoder by content, so without the list a ``.jpg`` holding EPS would run Ghostscript,
and other rarely used decoders would see hostile files. Anything else is "not an image file zoo
reads", whatever its name.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zoocli.errors import ZooError

# The decoders zoo lets Pillow use (the formats of the benchmarks' and users' photos); EPS, PDF,
# PSD, ICNS, SGI, TGA, ... are refused whatever the file is called.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: larger files are refused as likely decompression bombs


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               root: str | Path | None = None) -> Image.Image:
    """The image at ``path`` as an upright RGB image; ``ZooError`` (one line) on any failure.
    ``root``: the file opened must lie inside this folder (after symlinks), checked on the open
    descriptor."""
    p = Path(path)
    _check_regular(p)
    f = _open(p, root)
    try:
        with warnings.catch_warnings(), f:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            im = Image.open(f, formats=FORMATS)
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
        raise ZooError(f"'{p}' is not an image file zoo reads ({', '.join(FORMATS)})") from None
    except PermissionError:
        raise ZooError(f"image '{p}' cannot be read (permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ZooError(f"image '{p}' is truncated or corrupt: {_one_line(e)}") from None
    try:
        im = ImageOps.exif_transpose(im) or im
        return to_rgb(im)
    except (OSError, ValueError) as e:
        raise ZooError(f"image '{p}' cannot be converted to RGB: {_one_line(e)}") from None


def check_aspect(size: tuple[int, int], max_aspect: float | None, model: str, reason: str,
                 name: str | Path | None = None) -> None:
    """``ZooError`` when an image of ``size`` (width, height) is longer than ``max_aspect`` : 1 in
    either direction (a model family's limit, with ``reason``); ``max_aspect`` None: no limit."""
    w, h = size
    if w < 1 or h < 1:
        raise ZooError(f"image {f'{name!s} ' if name else ''}is {w}x{h} pixels: it has no area")
    ratio = max(w, h) / min(w, h)
    if max_aspect is not None and ratio > max_aspect:
        what = f"image '{_short(Path(name))}'" if name else "the image"
        raise ZooError(f"{what} is {w}x{h} pixels, an aspect ratio of {ratio:.4g}:1; {model} takes at "
                       f"most {max_aspect:g}:1 ({reason}); crop or pad it first")


def _check_regular(p: Path) -> None:
    """``ZooError`` unless ``p`` (after symlinks) is an existing regular file; nothing is opened."""
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise ZooError(f"image '{p}' does not exist") from None
    except OSError as e:  # a name too long, a loop of symlinks, a path through a file, ...
        raise ZooError(f"image '{_short(p)}' cannot be opened ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(mode):
        raise ZooError(f"image '{p}' is a directory, not an image file")
    if not stat.S_ISREG(mode):
        raise ZooError(f"image '{p}' is not a regular file (a FIFO, device or socket); zoo reads only files")


def _open(p: Path, root: str | Path | None):
    """``p`` opened for reading: a regular file (checked on the descriptor: swapped for a FIFO
    after ``_check_regular``, it is still refused, never waited on), inside ``root`` if given."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ZooError(f"image '{_short(p)}' does not exist") from None
    except PermissionError:
        raise ZooError(f"image '{_short(p)}' cannot be read (permission denied)") from None
    except OSError as e:
        raise ZooError(f"image '{_short(p)}' cannot be opened ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ZooError(f"image '{_short(p)}' is not a regular file; zoo reads only files")
        if root is not None:
            _check_inside(p, st, root)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_inside(p: Path, st: os.stat_result, root: str | Path) -> None:
    """``ZooError`` unless the opened file (``st``) is the file ``p``'s real path names, inside
    ``root`` after symlinks (a link swapped between the check and the open is caught either way)."""
    real, top = os.path.realpath(p), os.path.realpath(root)
    try:
        inside = os.path.commonpath([real, top]) == top
        now = os.stat(real)
    except (ValueError, OSError):
        inside, now = False, None
    if not inside or now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise ZooError(f"image '{_short(p)}' leads outside the image folder {_short(Path(root))} "
                       f"(after symlinks, when it was opened); images must be inside it "
                       f"(zoo eval --allow-outside-root reads them anyway)")


def _short(p: Path, limit: int = 200) -> str:
    s = str(p)
    return s if len(s) <= limit else s[:limit // 2] + "..." + s[-limit // 2:]


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
    """Scale a single-channel integer / float array to uint8. NaN pixels become 0 (black) and
    infinities the ends of the range; the scale is read from the finite pixels only."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        if not finite.any():
            return np.zeros(a.shape, np.uint8)
        lo, hi = float(a[finite].min()), float(a[finite].max())
        a = np.where(np.isnan(a), min(lo, 0.0), np.clip(a, lo, hi))  # NaN: black (0, or the floor)
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
