"""Decoding DDL images and forgery masks, with errors that name the file.

Conventions (documented in datasets/README.md):

* EXIF orientation is applied, so pixels are in display orientation; the index reads the
  same orientation from the file header, so its height/width match the decoded array.
* Every image mode becomes 8-bit RGB: grayscale is replicated to three channels, palette
  images are expanded, alpha is dropped (not composited), CMYK/YCbCr are converted, and
  16-bit images are scaled to 8 bits (value / 257).
* A forgery mask is read as one grayscale channel (color masks are converted to luminance)
  and a pixel is forged when its 8-bit value is greater than ``threshold`` (default 127).

Decoding is ``ddl_mask2former_serve.images`` (Pillow and numpy only), shared with the serving
path; this module adds the dataset's error type and the mask reading.
"""
import logging

import numpy as np

from ddl_mask2former_serve.images import ImageReadError, open_image, to_uint8_gray_or_rgb

__all__ = ["DDLDataError", "read_image", "read_forgery_mask", "to_uint8_gray_or_rgb"]

logger = logging.getLogger(__name__)


class DDLDataError(ImageReadError):
    """A DDL dataset file or folder is missing, unreadable or inconsistent.

    ``path`` is the offending file or folder; the message starts with it.
    """


def _open_oriented(path):
    """Decode ``path`` fully with Pillow and apply its EXIF orientation (``open_image``)."""
    try:
        return open_image(path)
    except DDLDataError:
        raise
    except ImageReadError as exc:
        raise DDLDataError(exc.path, exc.problem) from exc.__cause__


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
