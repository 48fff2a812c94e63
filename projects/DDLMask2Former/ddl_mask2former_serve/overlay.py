"""Overlay pictures of predictor outputs (numpy + OpenCV only): tools/demo.py, the folder scan's
report thumbnails and the web page's downloads draw with these.

An overlay shows ``mask_prob`` as a heat map blended over the image (the blend weight grows
with the probability, so real regions keep their colours), the outline of ``mask`` and a
caption with the detection verdict, e.g. "FAKE 0.97" or "REAL 0.03" (the number is always
``fake_prob``; the verdict is FAKE when ``fake_prob`` is above the threshold, as the model's
``is_fake``: pass the calibrated threshold, ``ForgeryPredictor.threshold``).
"""
from typing import Optional

import cv2
import numpy as np

__all__ = ["forged_area_fraction", "format_caption", "render_forgery_overlay"]

# Magenta: absent from the JET heat map, so the outline stays visible at mask_prob 0.5.
_CONTOUR_RGB = (255, 0, 255)
_FAKE_BANNER_RGB = (200, 30, 30)
_REAL_BANNER_RGB = (30, 140, 30)
_NEUTRAL_BANNER_RGB = (60, 60, 60)
_TEXT_RGB = (255, 255, 255)


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
        heat_bgr = cv2.applyColorMap(np.rint(prob * 255).astype(np.uint8), cv2.COLORMAP_JET)
        heat_rgb = heat_bgr[:, :, ::-1].astype(np.float32)
        weight = (alpha * prob)[:, :, None]
        canvas = canvas * (1.0 - weight) + heat_rgb * weight
    canvas = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    # Line widths and text size follow the image size, so big and small images read alike.
    scale = max(height, width) / 640.0
    thickness = max(1, int(round(2 * scale)))
    if mask is not None:
        binary = _check_map("mask", mask, height, width).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, _CONTOUR_RGB, thickness, lineType=cv2.LINE_AA)

    forged_fraction = forged_area_fraction(mask) if mask is not None else None
    caption = format_caption(fake_prob, forged_fraction, threshold)
    if fake_prob is None:
        banner = _NEUTRAL_BANNER_RGB
    else:
        banner = _FAKE_BANNER_RGB if fake_prob > threshold else _REAL_BANNER_RGB
    _draw_caption(canvas, caption, banner, scale)
    return canvas


def _draw_caption(canvas: np.ndarray, text: str, banner_rgb: tuple, scale: float) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    font_scale = max(0.4, 0.9 * scale)
    text_thickness = max(1, int(round(2 * scale)))
    (text_w, text_h), baseline = cv2.getTextSize(text, font, font_scale, text_thickness)
    pad = max(2, int(round(6 * scale)))
    right = min(canvas.shape[1] - 1, text_w + 2 * pad)
    bottom = min(canvas.shape[0] - 1, text_h + baseline + 2 * pad)
    cv2.rectangle(canvas, (0, 0), (right, bottom), banner_rgb, thickness=-1)
    cv2.putText(canvas, text, (pad, pad + text_h), font, font_scale, _TEXT_RGB, text_thickness,
                lineType=cv2.LINE_AA)


def heat_map_rgb(mask_prob: np.ndarray) -> np.ndarray:
    """uint8 HxWx3: the JET colour of ``mask_prob`` (0 dark blue, 0.5 green-yellow, 1 dark red),
    opaque; the web page lays it over the image under an opacity slider."""
    prob = np.clip(np.asarray(mask_prob, dtype=np.float32), 0, 1)
    levels = np.rint(prob * 255).astype(np.uint8)
    return np.ascontiguousarray(cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, :, ::-1])


def outline_rgba(mask: np.ndarray, thickness: Optional[int] = None) -> np.ndarray:
    """uint8 HxWx4: the outline of ``mask`` in the overlay's magenta, transparent elsewhere."""
    binary = np.asarray(mask).astype(np.uint8)
    height, width = binary.shape
    thickness = thickness or max(1, int(round(2 * max(height, width) / 640.0)))
    canvas = np.zeros((height, width, 4), dtype=np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, _CONTOUR_RGB + (255,), thickness, lineType=cv2.LINE_AA)
    return canvas


def fit_within(height: int, width: int, max_side: int):
    """(height, width) scaled down to at most ``max_side`` on the longer side (never enlarged)."""
    scale = min(1.0, max_side / float(max(height, width)))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def shrink(array: np.ndarray, max_side: int) -> np.ndarray:
    """An image or map scaled down (area filter) to at most ``max_side`` pixels on its longer side."""
    height, width = array.shape[:2]
    new_h, new_w = fit_within(height, width, max_side)
    if (new_h, new_w) == (height, width):
        return array
    return cv2.resize(array, (new_w, new_h), interpolation=cv2.INTER_AREA)


def encode_image(array: np.ndarray, extension: str = ".png", quality: int = 85) -> bytes:
    """PNG or JPEG bytes of a uint8 gray, RGB or RGBA array."""
    if array.ndim == 3:
        code = cv2.COLOR_RGBA2BGRA if array.shape[2] == 4 else cv2.COLOR_RGB2BGR
        array = cv2.cvtColor(np.ascontiguousarray(array), code)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if extension in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(extension, array, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.shape} array as {extension}")
    return encoded.tobytes()


def thumbnail(image: np.ndarray, prediction: dict, threshold: float, max_side: int = 256) -> np.ndarray:
    """A small overlay (heat map, outline, verdict caption) of one prediction, for reports."""
    small = shrink(image, max_side)
    height, width = small.shape[:2]
    mask_prob = prediction.get("mask_prob")
    if mask_prob is not None:
        mask_prob = cv2.resize(mask_prob.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    mask = None if mask_prob is None else mask_prob > 0.5
    return render_forgery_overlay(small, mask_prob, mask, prediction.get("fake_prob"), threshold=threshold)
