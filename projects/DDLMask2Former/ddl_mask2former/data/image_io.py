"""Decoding DDL images and forgery masks, with errors that name the file.

Conventions (documented in datasets/README.md):

* EXIF orientation is applied, so pixels are in display orientation; the index reads the
  same orientation from the file header, so its height/width match the decoded array.
* Every image mode becomes 8-bit RGB: grayscale is replicated to three channels, palette
  images are expanded, alpha is dropped (not composited), CMYK/YCbCr are converted, and
  16-bit images are scaled to 8 bits (value / 257).
* A forgery mask is read as one grayscale channel (color masks are converted to luminance)
  and a pixel is forged when its 8-bit value is greater than ``threshold`` (default 127).

This module needs only Pillow and numpy (no detectron2).
"""
import logging

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DDLDataError", "read_image", "read_forgery_mask", "to_uint8_gray_or_rgb"]

logger = logging.getLogger(__name__)

# Errors Pillow raises for unreadable, truncated or non-image files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class DDLDataError(ValueError):
    """A DDL dataset file or folder is missing, unreadable or inconsistent.

    ``path`` is the offending file or folder; the message starts with it.
    """

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # Rebuild from (path, problem) when the error crosses a process boundary.
        return type(self), (self.path, self.problem)


def _open_oriented(path):
    """Decode ``path`` fully with Pillow and apply its EXIF orientation."""
    try:
        with Image.open(path) as img:
            img.load()
            # exif_transpose returns a copy, so the file handle can close safely.
            return ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise DDLDataError(path, "file does not exist") from None
    except Image.UnidentifiedImageError:
        raise DDLDataError(path, "not an image file (Pillow cannot identify it)") from None
    except _DECODE_ERRORS as exc:
        raise DDLDataError(path, f"cannot decode image, it may be truncated or corrupt ({exc})") from exc


def to_uint8_gray_or_rgb(img, gray):
    """Convert a decoded Pillow image to an 8-bit array: HxW if ``gray`` else HxWx3 RGB."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        # Pillow's convert() clips 16-bit values at 255; scale them instead.
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        values = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return values if gray else np.repeat(values[:, :, None], 3, axis=2)
    target = "L" if gray else "RGB"
    if img.mode != target:
        img = img.convert(target)
    return np.asarray(img, dtype=np.uint8)


def read_image(path, format="RGB"):
    """Read an image as uint8 HxWx3 in ``format`` ("RGB" or "BGR"), EXIF orientation applied.

    Raises DDLDataError naming ``path`` if the file is missing, not an image, or corrupt.
    """
    if format not in ("RGB", "BGR"):
        raise ValueError(f"read_image: format must be 'RGB' or 'BGR', got {format!r}")
    rgb = to_uint8_gray_or_rgb(_open_oriented(path), gray=False)
    if format == "BGR":
        rgb = rgb[:, :, ::-1]
    return np.ascontiguousarray(rgb)


def read_forgery_mask(path, threshold=127):
    """Read a forgery mask as a bool HxW array: True where the 8-bit value is > ``threshold``.

    Raises DDLDataError naming ``path`` if the file is missing, not an image, or corrupt.
    Logs a warning when the mask is non-zero but entirely <= threshold (e.g. a 0/1 mask),
    since that silently turns a fake image's mask into all-real pixels.
    """
    gray = to_uint8_gray_or_rgb(_open_oriented(path), gray=True)
    forged = gray > threshold
    if not forged.any():
        peak = int(gray.max(initial=0))
        if peak > 0:
            logger.warning(
                "%s: mask has no value above the threshold %d (max value %d); a 0/1 mask "
                "needs a lower INPUT.MASK_THRESHOLD", path, threshold, peak)
    return forged
