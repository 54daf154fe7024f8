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
    return load_image(path, background)[0]


def load_image(path: str, background: tuple[int, int, int] = DEFAULT_BACKGROUND,
               keep_alpha: bool = False) -> tuple[Image.Image, Image.Image | None]:
    """(RGB composited on `background`, the alpha channel as an 'L' image or None) after EXIF rotation.

    The alpha channel is returned only with `keep_alpha` and only for images that have one (it becomes the loss
    mask with `alpha_mask`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                alpha = _alpha(im) if keep_alpha else None
                return to_rgb(im, background), alpha
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UnreadableImage(_reason(path, e)) from None


_VERIFIED: dict[tuple[str, int, int], str | None] = {}


def check_decodable(path: str) -> None:
    """Decode the whole file once (JPEGs at 1/8 scale, which still reads every byte) so that a truncated or corrupt
    image is found while scanning, not in the middle of training. Results are remembered per file version."""
    st = os.stat(path)
    memo = (path, st.st_size, st.st_mtime_ns)
    if memo not in _VERIFIED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    if im.format == "JPEG":
                        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
            _VERIFIED[memo] = None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:
            _VERIFIED[memo] = _reason(path, e)
    if _VERIFIED[memo] is not None:
        raise UnreadableImage(_VERIFIED[memo])


def _alpha(im: Image.Image) -> Image.Image | None:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        return im.getchannel("A")
    return None


def parse_color(text: str) -> tuple[int, int, int]:
    """'white', 'black', '#808080', '128,128,128' -> (r, g, b); ValueError when it is none of those."""
    from PIL import ImageColor

    raw = text.strip()
    if "," in raw:
        parts = [p.strip() for p in raw.split(",")]
        if len(parts) == 3 and all(p.isdigit() and int(p) <= 255 for p in parts):
            return int(parts[0]), int(parts[1]), int(parts[2])
        raise ValueError(f"{text!r} is not 'r,g,b' with values 0-255")
    rgb = ImageColor.getrgb(raw)
    return rgb[0], rgb[1], rgb[2]


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
