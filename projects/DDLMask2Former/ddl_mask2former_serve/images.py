"""Decoding images as users and analysts hand them over, with errors that name the file.

One place for "any accepted input -> uint8 HxWx3 RGB": file paths and uploaded bytes (Pillow,
EXIF orientation applied), numpy arrays (RGB or BGR; a grayscale HxW or HxWx1 array, as
``cv2.imread(path, 0)`` gives, is replicated to three channels) and PIL images. Modes: palette
expanded, alpha dropped (not composited), CMYK/YCbCr converted, 16-bit scaled to 8 bits
(value / 257). The dataset loader (``ddl_mask2former.data.image_io``) decodes through here too.

``ImageLimits`` bounds what a server or a folder scan decodes: file bytes, decoded pixels (read
from the header before any pixel is decoded, so a decompression bomb never expands) and the
smallest side the model can say anything about.

Needs only numpy and Pillow.
"""
import io
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageReadError", "ImageLimits", "IMAGE_EXTENSIONS", "open_image", "to_uint8_gray_or_rgb",
           "load_image", "base_scale_size", "resize_rgb", "resize_bilinear", "human_bytes"]

# What a folder scan picks up (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")
# Errors Pillow raises for unreadable, truncated or non-image files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_CHANNEL_ORDERS = ("RGB", "BGR")


class ImageReadError(ValueError):
    """An image that cannot be used: ``path`` names it (a file path or an upload's name),
    ``problem`` says why; the message is ``"<path>: <problem>"``."""

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # Rebuild from (path, problem) when the error crosses a process boundary.
        return type(self), (self.path, self.problem)


@dataclass(frozen=True)
class ImageLimits:
    """What ``open_image`` accepts; None: no limit."""

    max_bytes: Optional[int] = 50 * 2**20
    max_pixels: Optional[int] = 40_000_000
    min_side: int = 16

    def check_bytes(self, name, size: int) -> None:
        if size == 0:
            raise ImageReadError(name, "empty file (0 bytes)")
        if self.max_bytes is not None and size > self.max_bytes:
            raise ImageReadError(name, f"file is {human_bytes(size)}, over the limit of {human_bytes(self.max_bytes)}")

    def check_size(self, name, width: int, height: int) -> None:
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise ImageReadError(name, f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
                                       f"over the limit of {self.max_pixels / 1e6:.0f} megapixels "
                                       "(refused before decoding)")
        if min(width, height) < self.min_side:
            raise ImageReadError(name, f"image is only {width}x{height} pixels; the model needs at least "
                                       f"{self.min_side} pixels on each side")


def human_bytes(count: int) -> str:
    """"512 KiB", "3.2 MiB": sizes as people read them."""
    if count < 2**20:
        return f"{count / 2**10:.0f} KiB"
    return f"{count / 2**20:.1f} MiB".replace(".0 MiB", " MiB")


NO_LIMITS = ImageLimits(max_bytes=None, max_pixels=None, min_side=1)


def open_image(source: Union[str, os.PathLike, bytes], name: Optional[str] = None,
               limits: ImageLimits = NO_LIMITS) -> Image.Image:
    """Decode a file path or encoded bytes fully with Pillow, EXIF orientation applied.

    ``name`` is how errors name the input (default: the path). Raises ``ImageReadError`` for a
    missing, empty, oversized, non-image, truncated or corrupt input. Pillow's own
    decompression-bomb limit is left as the host set it; ``limits.max_pixels`` is checked on
    the header first.
    """
    is_path = isinstance(source, (str, os.PathLike))
    name = str(name if name is not None else (os.fspath(source) if is_path else "upload"))
    try:
        if is_path:
            limits.check_bytes(name, os.path.getsize(source))
            handle = open(source, "rb")
        else:
            limits.check_bytes(name, len(source))
            handle = io.BytesIO(source)
    except FileNotFoundError:
        raise ImageReadError(name, "file does not exist") from None
    except IsADirectoryError:
        raise ImageReadError(name, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageReadError(name, "permission denied") from None
    with handle:
        try:
            with Image.open(handle) as img:
                limits.check_size(name, *img.size)
                img.load()
                # exif_transpose returns a copy, so the file can close safely.
                return ImageOps.exif_transpose(img)
        except ImageReadError:
            raise
        except Image.UnidentifiedImageError:
            raise ImageReadError(name, "not an image file (Pillow cannot identify it)") from None
        except Image.DecompressionBombError as exc:
            # Pillow refuses at open when the header's size is over twice its own limit.
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"its header says {int(found.group(1)) / 1e6:,.0f} megapixels: " if found else ""
            limit = "" if limits.max_pixels is None else f" (the limit here is {limits.max_pixels / 1e6:.0f} megapixels)"
            raise ImageReadError(name, f"{size}refused before decoding as a decompression bomb{limit}") from None
        except _DECODE_ERRORS as exc:
            raise ImageReadError(name, f"cannot decode image, it may be truncated or corrupt ({exc})") from exc


def to_uint8_gray_or_rgb(img: Image.Image, gray: bool) -> np.ndarray:
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


def load_image(source, format: str = "RGB", name: str = "input image",
               limits: ImageLimits = NO_LIMITS) -> np.ndarray:
    """Any accepted input -> contiguous uint8 HxWx3 RGB array at its original size.

    Args:
        source: a file path or encoded bytes (``open_image``), a uint8 numpy array (HxWx3 in
            ``format`` channel order, or grayscale HxW / HxWx1), or a PIL image (any mode,
            converted as it is, without EXIF rotation).
        format: channel order of a 3-channel array, "RGB" (Pillow, matplotlib) or "BGR"
            (``cv2.imread``); ignored otherwise.
        name: how errors name an array, bytes or PIL input.
    """
    if format not in _CHANNEL_ORDERS:
        raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}")
    if isinstance(source, (str, os.PathLike)):
        return np.ascontiguousarray(to_uint8_gray_or_rgb(open_image(source, limits=limits), gray=False))
    if isinstance(source, (bytes, bytearray)):
        return np.ascontiguousarray(to_uint8_gray_or_rgb(open_image(bytes(source), name, limits), gray=False))
    if isinstance(source, Image.Image):
        return np.ascontiguousarray(to_uint8_gray_or_rgb(source, gray=False))
    if isinstance(source, np.ndarray):
        shape_ok = source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3))
        if source.dtype != np.uint8 or not shape_ok:
            raise ValueError(f"{name}: expected a uint8 HxWx3 (color), HxW or HxWx1 (grayscale) array, got "
                             f"{source.dtype} {source.shape}")
        if min(source.shape[:2]) == 0:
            raise ValueError(f"{name}: empty image of shape {source.shape}")
        if source.ndim == 2 or source.shape[2] == 1:
            gray = source.reshape(source.shape[:2])
            return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
        return np.ascontiguousarray(source[:, :, ::-1] if format == "BGR" else source)
    raise TypeError(f"{name}: expected a file path, a uint8 numpy array (HxWx3, HxW or HxWx1) or a PIL "
                    f"image, got {type(source).__name__}")


def base_scale_size(height, width, base_scale, ratio=1.0, enlarge=True):
    """Output (height, width) of a keep-ratio resize to ``base_scale`` times ``ratio``.

    ``base_scale`` = (long, short): the long side becomes at most long*ratio and the short
    side at most short*ratio, whichever is reached first (MMSegmentation's "scale" for
    keep_ratio=True, which may enlarge small images). With ``enlarge=False`` an image already
    within the base scale keeps its size before the ratio applies: no resampling blurs the
    pixel-level traces of a forgery that needs none.
    """
    factor = min(max(base_scale) / max(height, width), min(base_scale) / min(height, width))
    if not enlarge:
        factor = min(factor, 1.0)
    factor *= ratio
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 HxWxC resized with Pillow's bilinear filter, as the evaluation mapper resizes
    (detectron2's ``ResizeTransform`` on uint8 images)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _bilinear_axis(in_size: int, out_size: int):
    """Source indices and weights of a half-pixel bilinear resize along one axis, as PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` computes them (no antialiasing)."""
    scale = np.float32(in_size / out_size)
    source = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    low = source.astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    weight_high = (source - low).astype(np.float32)
    return low, high, np.float32(1) - weight_high, weight_high


def resize_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 HxW map resized to ``height`` x ``width`` (the model's map resize)."""
    values = np.asarray(values, dtype=np.float32)
    low, high, w_low, w_high = _bilinear_axis(values.shape[0], height)
    rows = values[low] * w_low[:, None] + values[high] * w_high[:, None]
    low, high, w_low, w_high = _bilinear_axis(values.shape[1], width)
    return rows[:, low] * w_low[None, :] + rows[:, high] * w_high[None, :]
