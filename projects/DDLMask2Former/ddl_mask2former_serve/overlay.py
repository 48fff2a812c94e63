"""Overlay pictures of predictor outputs (numpy and Pillow only): tools/demo.py, the training
report's contact sheet, the folder scan's thumbnails and the web page draw with these.

An overlay shows ``mask_prob`` as a heat map blended over the image (the blend weight grows
with the probability, so real regions keep their colours), the outline of ``mask`` and a
caption with the detection verdict, e.g. "FAKE 0.97" or "REAL 0.03" (the number is always
``fake_prob``; the verdict is FAKE when ``fake_prob`` is above the threshold, as the model's
``is_fake``: pass the calibrated threshold, ``ForgeryPredictor.threshold``).
"""
import io
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["forged_area_fraction", "format_caption", "render_forgery_overlay", "jet_colors", "heat_map_rgb",
           "outline_rgba", "fit_within", "shrink", "encode_image", "thumbnail"]

# Magenta: absent from the JET heat map, so the outline stays visible at mask_prob 0.5.
_CONTOUR_RGB = (255, 0, 255)
_FAKE_BANNER_RGB = (200, 30, 30)
_REAL_BANNER_RGB = (30, 140, 30)
_NEUTRAL_BANNER_RGB = (60, 60, 60)
_TEXT_RGB = (255, 255, 255)


def _jet_table() -> np.ndarray:
    """(256, 3) uint8 JET: dark blue at 0, cyan, yellow, dark red at 1."""
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.clip(1.5 - np.abs(4.0 * x - offset), 0.0, 1.0) for offset in (3.0, 2.0, 1.0)]
    return np.rint(np.stack(channels, axis=1) * 255).astype(np.uint8)


_JET = _jet_table()


def jet_colors(prob: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 JET colours of probabilities in [0, 1]."""
    levels = np.rint(np.clip(np.asarray(prob, dtype=np.float32), 0, 1) * 255).astype(np.uint8)
    return _JET[levels]


def format_caption(fake_prob: Optional[float] = None, forged_fraction: Optional[float] = None,
                   threshold: float = 0.5) -> str:
    """"FAKE 0.97" / "REAL 0.03" from ``fake_prob``; the forged-area share when there is no
    detection output (localization-only models)."""
    if fake_prob is not None:
        verdict = "FAKE" if fake_prob > threshold else "REAL"
        return f"{verdict} {fake_prob:.2f}"
    if forged_fraction is not None:
        return f"forged area {100.0 * forged_fraction:.1f}%"
    return "no prediction"


def forged_area_fraction(mask: np.ndarray) -> float:
    """Share of pixels predicted forged, in [0, 1]."""
    mask = np.asarray(mask)
    if mask.size == 0:
        return 0.0
    return float(np.count_nonzero(mask)) / float(mask.size)


def _check_map(name: str, array: np.ndarray, height: int, width: int) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != (height, width):
        raise ValueError(f"{name} has shape {array.shape}, the image is {height}x{width}")
    return array


def _line_width(height: int, width: int) -> int:
    return max(1, int(round(2 * max(height, width) / 640.0)))


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """bool HxW: the mask's border pixels (inside the mask), widened to ``thickness``."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    border = np.asarray(image) > np.asarray(image.filter(ImageFilter.MinFilter(3)))
    if thickness > 1 and border.any():
        widened = Image.fromarray(border.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * (thickness // 2) + 1))
        border = np.asarray(widened) > 0
    return border


def render_forgery_overlay(image: np.ndarray, mask_prob: Optional[np.ndarray] = None,
                           mask: Optional[np.ndarray] = None, fake_prob: Optional[float] = None,
                           alpha: float = 0.6, threshold: float = 0.5) -> np.ndarray:
    """Draw a prediction over an image.

    Args:
        image: uint8 HxWx3 RGB.
        mask_prob: HxW float in [0, 1] (per-pixel forgery probability) or None.
        mask: HxW bool (predicted forged pixels) or None; its outline is drawn.
        fake_prob: image-level probability of forgery, or None.
        alpha: blend weight of the heat map where ``mask_prob`` is 1.
        threshold: ``fake_prob`` above which the caption says FAKE (the verdict's threshold).

    Returns:
        uint8 HxWx3 RGB picture, same size as ``image``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    canvas = image.astype(np.float32)
    if mask_prob is not None:
        prob = np.clip(_check_map("mask_prob", mask_prob, height, width).astype(np.float32), 0, 1)
        weight = (alpha * prob)[:, :, None]
        canvas = canvas * (1.0 - weight) + jet_colors(prob).astype(np.float32) * weight
    canvas = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    if mask is not None:
        canvas[_outline(_check_map("mask", mask, height, width), _line_width(height, width))] = _CONTOUR_RGB
    forged_fraction = forged_area_fraction(mask) if mask is not None else None
    caption = format_caption(fake_prob, forged_fraction, threshold)
    if fake_prob is None:
        banner = _NEUTRAL_BANNER_RGB
    else:
        banner = _FAKE_BANNER_RGB if fake_prob > threshold else _REAL_BANNER_RGB
    picture = Image.fromarray(canvas)
    _draw_caption(picture, caption, banner, max(height, width) / 640.0)
    return np.asarray(picture)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _draw_caption(picture: Image.Image, text: str, banner_rgb: tuple, scale: float) -> None:
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, int(round(24 * scale))))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, int(round(6 * scale)))
    box_right = min(picture.width - 1, right - left + 2 * pad)
    box_bottom = min(picture.height - 1, bottom - top + 2 * pad)
    draw.rectangle((0, 0, box_right, box_bottom), fill=banner_rgb)
    draw.text((pad - left, pad - top), text, fill=_TEXT_RGB, font=font)


def heat_map_rgb(mask_prob: np.ndarray) -> np.ndarray:
    """uint8 HxWx3: the JET colour of ``mask_prob`` (0 dark blue, 0.5 green-yellow, 1 dark red),
    opaque; the web page lays it over the image under an opacity slider."""
    return np.ascontiguousarray(jet_colors(mask_prob))


def outline_rgba(mask: np.ndarray, thickness: Optional[int] = None) -> np.ndarray:
    """uint8 HxWx4: the outline of ``mask`` in the overlay's magenta, transparent elsewhere."""
    mask = np.asarray(mask)
    canvas = np.zeros(mask.shape + (4,), dtype=np.uint8)
    canvas[_outline(mask, thickness or _line_width(*mask.shape))] = _CONTOUR_RGB + (255,)
    return canvas


def fit_within(height: int, width: int, max_side: int):
    """(height, width) scaled down to at most ``max_side`` on the longer side (never enlarged)."""
    scale = min(1.0, max_side / float(max(height, width)))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def shrink(array: np.ndarray, max_side: int) -> np.ndarray:
    """A uint8 image or float32 map scaled down (box filter) to at most ``max_side`` pixels on its
    longer side."""
    height, width = array.shape[:2]
    new_h, new_w = fit_within(height, width, max_side)
    if (new_h, new_w) == (height, width):
        return array
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.BOX))
    resized = Image.fromarray(np.asarray(array, dtype=np.float32), mode="F").resize((new_w, new_h), Image.BOX)
    return np.asarray(resized, dtype=np.float32)


def encode_image(array: np.ndarray, extension: str = ".png", quality: int = 85) -> bytes:
    """PNG or JPEG bytes of a uint8 gray (HxW), RGB or RGBA array."""
    buffer = io.BytesIO()
    if extension in (".jpg", ".jpeg"):
        Image.fromarray(array).convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def thumbnail(image: np.ndarray, prediction: dict, threshold: float, max_side: int = 256) -> np.ndarray:
    """A small overlay (heat map, outline, verdict caption) of one prediction, for reports."""
    small = shrink(image, max_side)
    mask_prob = prediction.get("mask_prob")
    if mask_prob is not None:
        mask_prob = shrink(mask_prob.astype(np.float32), max_side)
        if mask_prob.shape != small.shape[:2]:
            raise ValueError(f"mask_prob {mask_prob.shape} does not match the image {small.shape[:2]}")
    mask = None if mask_prob is None else mask_prob > 0.5
    return render_forgery_overlay(small, mask_prob, mask, prediction.get("fake_prob"), threshold=threshold)
