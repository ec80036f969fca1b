"""Decode photo bytes into RGB arrays and resize them for a backbone.

Plain JPEGs (YCbCr or grey, no EXIF) go to simplejpeg when it is installed: the same
libjpeg-turbo pixels as Pillow, bit for bit, in half the time, without holding the GIL.
Everything else, and any JPEG simplejpeg rejects, goes to Pillow (it tells a truncated JPEG from
a whole one, reads CMYK, palette and 16-bit files, applies EXIF orientation, decodes JPEGs at
reduced size) and gets Pillow's error. OpenCV resizes (fast, releases the GIL).
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # optional: a Kaggle image may not have it, and Pillow gives the same pixels
    import simplejpeg
except ImportError:
    simplejpeg = None

# Kaggle photos are at most 500 px a side; a web upload may be anything. Refuse decompression
# bombs well before they exhaust memory.
MAX_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = None  # we check the size ourselves, with our own message

_INTERPOLATION = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


class ImageError(ValueError):
    """A photo that cannot be used, with the file's name and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def decode_rgb(data: bytes, name: str, draft_size: tuple[int, int] | None = None) -> np.ndarray:
    """Bytes of any image file -> (H, W, 3) uint8 RGB, honouring EXIF orientation.

    ``draft_size`` (width, height) lets the JPEG decoder scale down by 1/2, 1/4 or 1/8 while
    staying at least that large: much faster for big photos, slightly different pixels.
    Raises ``ImageError`` naming the file for empty, truncated, corrupt or non-image data.
    """
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    if draft_size is None:
        fast = _decode_plain_jpeg(data, name)
        if fast is not None:
            return fast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd EXIF; the pixels are still fine
            image = Image.open(io.BytesIO(data))
            _check_size(name, image.width, image.height)
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (format not recognised, or its header is corrupt)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason:
            reason = f"truncated file ({reason})"
        raise ImageError(name, f"corrupt or unreadable image: {reason}") from None


def _decode_plain_jpeg(data: bytes, name: str) -> np.ndarray | None:
    """simplejpeg's decode of a JPEG that Pillow would decode to the same pixels, else None:
    YCbCr or grey (not CMYK/YCCK), no EXIF block (orientation is Pillow's job), and no warning
    from libjpeg (strict: truncated or corrupt data falls through to Pillow's verdict)."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff" or b"Exif\x00\x00" in data[:65536]:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray"):
        return None
    _check_size(name, width, height)
    try:
        return simplejpeg.decode_jpeg(data, "RGB", strict=True)
    except ValueError:
        return None


def _check_size(name: str, width: int, height: int) -> None:
    """Refuse a decompression bomb from its header, before any pixel is decoded."""
    if width * height > MAX_PIXELS:
        raise ImageError(name, f"too large ({width}x{height} pixels; the limit is {MAX_PIXELS:,})")


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clip.
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() if arr.max() > 255 else 255.0
        gray = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become white, as they show in a browser.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = background
    elif image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def resize(rgb: np.ndarray, size: tuple[int, int], method: str = "area") -> np.ndarray:
    """Resize (H, W, 3) to ``size`` = (height, width), stretching as the write-ups do."""
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    interpolation = _INTERPOLATION[method]
    if method == "area" and (rgb.shape[0] < height or rgb.shape[1] < width):
        interpolation = cv2.INTER_LINEAR  # INTER_AREA is meant for shrinking
    return cv2.resize(rgb, (width, height), interpolation=interpolation)


def load_for_backbone(data: bytes, name: str, size: tuple[int, int], method: str = "area",
                      fast_decode: bool = False) -> np.ndarray:
    """Bytes -> (height, width, 3) uint8 RGB, ready for a backbone's input."""
    draft = (size[1], size[0]) if fast_decode else None
    return resize(decode_rgb(data, name, draft), size, method)
