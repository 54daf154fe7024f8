"""Reading images safely: every mode Pillow can open becomes 8-bit RGB, EXIF rotation is honoured, and anything
that is not a readable image raises `UnreadableImage` with a reason instead of crashing the run."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".jxl")
DEFAULT_BACKGROUND = (255, 255, 255)
# Refuse decompression bombs long before they exhaust memory (a 16k x 16k image is 1 GiB of RGB).
MAX_PIXELS = 16384 * 16384


class UnreadableImage(Exception):
    """The file could not be used as an image; `str(e)` says why."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) as the image will be used, i.e. after EXIF rotation, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if _exif_orientation(im) in (5, 6, 7, 8):
                w, h = h, w
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(_reason(path, e)) from None
    if w <= 0 or h <= 0:
        raise UnreadableImage(f"{path}: image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise UnreadableImage(f"{path}: {w}x{h} is too large (more than {MAX_PIXELS} pixels)")
    return w, h


def load_rgb(path: str, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Decode fully into 8-bit RGB; transparent pixels are composited on `background`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im, background)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UnreadableImage(_reason(path, e)) from None


def to_rgb(im: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = _high_depth_to_l(im)
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if im.mode != "RGB":  # L, 1, CMYK, YCbCr, LAB, HSV
        return im.convert("RGB")
    return im


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit grey to 8-bit: scale by the format's range, not by clipping at 255."""
    arr = np.asarray(im).astype(np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    if im.mode == "F":
        top = max(float(arr.max(initial=1.0)), 1.0)
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except (AttributeError, ValueError, TypeError, SyntaxError):
        return 1


def _reason(path: str, e: BaseException) -> str:
    if os.path.exists(path) and os.path.getsize(path) == 0:
        return f"{path}: file is empty (0 bytes)"
    if isinstance(e, UnidentifiedImageError):
        return f"{path}: not an image Pillow can read (wrong extension or unsupported format)"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"{path}: image is too large to load safely"
    text = str(e) or type(e).__name__
    if "truncated" in text.lower():
        return f"{path}: image file is truncated (incomplete download or copy?)"
    return f"{path}: cannot read image: {text}"
