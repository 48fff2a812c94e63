"""Image perturbations of the robustness benchmark (``tools/robustness.py``), numpy and OpenCV only.

The training degradation (``augmentations.py``, INPUT.DEGRADATION) applies the same blur, JPEG
and resized-size definitions, so what training sees is what the benchmark measures.

Definitions (docs/EVALUATION.md, "Robustness"); every function takes and returns uint8 arrays,
HxWx3 RGB (or HxW gray), and never changes its input:

* ``jpeg`` q: JPEG encode at quality q with OpenCV's libjpeg (its defaults: 4:2:0 chroma
  subsampling, baseline), then decode. Levels 50, 60, 70, 80, 90, 100 (IMDL-BenCo).
* ``blur`` k: ``cv2.GaussianBlur(image, (k, k), 0)``: a k x k Gaussian whose sigma is OpenCV's
  default for that size, 0.3 * ((k - 1) / 2 - 1) + 0.8; borders reflected (BORDER_REFLECT_101).
  Levels 3, 7, 11, 15, 19, 23 (IMDL-BenCo).
* ``noise`` v: add independent N(0, v) noise to every pixel and channel (v in 8-bit units, so
  sigma = sqrt(v)), round to the nearest integer and clip to [0, 255]. Levels 3, 7, 11, 15, 19,
  23 (IMDL-BenCo). The noise comes from the ``rng`` given (``numpy.random.Generator``).
* ``resize`` f: scale both sides by f to ``resized_size`` (round half up, at least 1 pixel), with
  ``cv2.INTER_AREA`` when shrinking (``cv2.INTER_LINEAR`` when enlarging). Masks follow with
  ``resize_mask`` (``perturb_mask``). Levels 0.78, 0.5, 0.25.
* ``chain`` "resize0.5+jpeg75": resize 0.5, then JPEG at quality 75 (``CHAINS``).

``resize_mask`` is the one rule by which a forgery mask follows a resized image, here and in
training (``RescaleTransform``): nearest neighbour at pixel centres (``cv2.INTER_NEAREST_EXACT``;
Pillow's NEAREST, which detectron2's ``ResizeTransform`` uses, samples the same pixels). Output
pixel i takes input pixel floor((i + 0.5) * old / new), the centre of the block that INTER_AREA
averages into it; plain ``INTER_NEAREST`` takes the block's top-left pixel instead, which
shifts a shrunk mask by up to half a block against its image.

``convention="imdl-benco"`` (``CONVENTIONS``) reproduces what IMDL-BenCo's robustness wrappers do
with albumentations, where it differs from the definitions above (docs/EVALUATION.md,
"Robustness"): ``jpeg`` q draws the quality q - 1 or q (from ``rng``) and hands the RGB array to
OpenCV's encoder, which takes it for BGR (so chroma subsampling works on swapped channels);
``noise`` adds the noise in float32 and truncates to uint8 instead of rounding (about 0.5 grey
levels darker on average). ``blur`` and ``resize`` are the same in both.

``SWEEPS`` maps each kind to its levels, mildest first. ``perturb(image, kind, level, rng)``
accepts any valid level of a kind (training augmentation may use others); the benchmark sticks
to ``SWEEPS`` (``parse_level``).
"""
import math
from collections import OrderedDict

import cv2
import numpy as np

__all__ = [
    "SWEEPS",
    "CHAINS",
    "CONVENTIONS",
    "perturb",
    "perturb_mask",
    "jpeg_compress",
    "gaussian_blur",
    "gaussian_noise",
    "resize_image",
    "resize_mask",
    "resized_size",
    "output_size",
    "parse_level",
    "level_key",
]

# kind -> levels, mildest first
SWEEPS = OrderedDict(
    jpeg=(100, 90, 80, 70, 60, 50),
    blur=(3, 7, 11, 15, 19, 23),
    noise=(3, 7, 11, 15, 19, 23),
    resize=(0.78, 0.5, 0.25),
    chain=("resize0.5+jpeg75",),
)
# chain level -> its steps (kind, level), applied in order
CHAINS = {"resize0.5+jpeg75": (("resize", 0.5), ("jpeg", 75))}
# "ours": the definitions above; "imdl-benco": IMDL-BenCo's JPEG and noise (module docstring).
CONVENTIONS = ("ours", "imdl-benco")


def _check_image(image):
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(f"perturbations take uint8 arrays, got {getattr(image, 'dtype', type(image))}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"perturbations take HxW or HxWx3 images, got shape {image.shape}")


def jpeg_compress(image, quality, swap_channels=True):
    """Encode as JPEG at ``quality`` (1-100) with OpenCV's defaults, then decode.
    ``swap_channels=False`` hands an RGB array to the BGR encoder as it is (IMDL-BenCo)."""
    _check_image(image)
    quality = int(quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    color = image.ndim == 3 and image.shape[2] == 3
    swap = color and swap_channels
    data = image[:, :, ::-1] if swap else image  # OpenCV encodes BGR
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(data), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {image.shape}")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    if swap:
        decoded = decoded[:, :, ::-1]
    return np.ascontiguousarray(decoded.reshape(image.shape))


def gaussian_blur(image, kernel_size):
    """``cv2.GaussianBlur(image, (k, k), 0)``: OpenCV's default sigma for a k x k kernel."""
    _check_image(image)
    k = int(kernel_size)
    if k != kernel_size or k < 1 or k % 2 == 0:
        raise ValueError(f"Gaussian blur kernel size must be an odd positive integer, got {kernel_size}")
    return cv2.GaussianBlur(image, (k, k), 0).reshape(image.shape)


def gaussian_noise(image, variance, rng, truncate=False):
    """Add N(0, ``variance``) noise (8-bit units) to every value, round, clip to [0, 255].
    ``truncate``: add in float32, clip, then truncate to uint8 (IMDL-BenCo's albumentations)."""
    _check_image(image)
    if not (isinstance(variance, (int, float, np.integer, np.floating)) and variance >= 0):
        raise ValueError(f"Gaussian noise variance must be a number >= 0, got {variance!r}")
    if rng is None:
        raise ValueError("Gaussian noise needs a numpy random Generator (rng)")
    noise = rng.standard_normal(image.shape) * math.sqrt(float(variance))
    if truncate:
        return np.clip(image.astype(np.float32) + noise.astype(np.float32), 0, 255).astype(np.uint8)
    return np.clip(np.rint(image.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def resized_size(height, width, factor):
    """(height, width) scaled by ``factor``, rounded half up, at least 1 pixel each."""
    if not (isinstance(factor, (int, float, np.integer, np.floating)) and factor > 0):
        raise ValueError(f"resize factor must be a number > 0, got {factor!r}")
    return (max(1, int(math.floor(height * factor + 0.5))),
            max(1, int(math.floor(width * factor + 0.5))))


def resize_image(image, factor):
    """Scale by ``factor``: ``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_LINEAR`` when enlarging."""
    _check_image(image)
    height, width = resized_size(image.shape[0], image.shape[1], factor)
    if (height, width) == image.shape[:2]:
        return image.copy()
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (width, height), interpolation=interpolation)
    return resized.reshape((height, width) + image.shape[2:])


def resize_mask(mask, height, width):
    """``mask`` (HxW, any dtype, bool included) resampled to (height, width) by nearest neighbour
    at pixel centres, so its values stay the ones it had and it stays aligned with its image."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask is an HxW array, got shape {mask.shape}")
    if (height, width) == mask.shape:
        return mask.copy()
    data = mask.astype(np.uint8) if mask.dtype == bool else mask
    resized = cv2.resize(data, (int(width), int(height)), interpolation=cv2.INTER_NEAREST_EXACT)
    return resized.astype(bool) if mask.dtype == bool else resized


def _check_kind(kind):
    if kind not in SWEEPS:
        raise ValueError(f"unknown perturbation {kind!r} (known: {', '.join(SWEEPS)})")


def _steps(kind, level):
    if kind == "chain":
        if level not in CHAINS:
            raise ValueError(f"unknown chain {level!r} (known: {', '.join(CHAINS)})")
        return CHAINS[level]
    _check_kind(kind)
    return ((kind, level),)


def perturb(image, kind, level, rng=None, convention="ours"):
    """``image`` (uint8 RGB or gray) with perturbation ``kind`` at ``level`` applied.

    ``rng`` (``numpy.random.Generator``) is needed by ``noise`` only (and by ``jpeg`` under the
    "imdl-benco" ``convention``, for its quality); the same generator state gives the same output.
    """
    _check_image(image)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown perturbation convention {convention!r} (known: {', '.join(CONVENTIONS)})")
    benco = convention == "imdl-benco"
    for step, step_level in _steps(kind, level):
        if step == "jpeg":
            quality = step_level
            if benco:
                if rng is None:
                    raise ValueError("IMDL-BenCo's JPEG draws its quality: it needs a numpy random Generator (rng)")
                quality = max(1, int(rng.integers(int(step_level) - 1, int(step_level) + 1)))
            image = jpeg_compress(image, quality, swap_channels=not benco)
        elif step == "blur":
            image = gaussian_blur(image, step_level)
        elif step == "noise":
            image = gaussian_noise(image, step_level, rng, truncate=benco)
        else:
            image = resize_image(image, step_level)
    return image


def output_size(kind, level, height, width):
    """(height, width) of an image of that size after ``perturb(..., kind, level)``."""
    for step, step_level in _steps(kind, level):
        if step == "resize":
            height, width = resized_size(height, width, step_level)
    return height, width


def perturb_mask(mask, kind, level, size=None):
    """A forgery mask that follows ``perturb(image, kind, level)``.

    Photometric perturbations leave it as it is (a copy); resizing (``resize`` and the chain)
    scales it with ``resize_mask`` to ``size`` = (height, width) of the perturbed image
    (default: ``output_size``), so its values stay the ones it had (a binary mask stays binary).
    Keeps the dtype (bool included).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask is an HxW array, got shape {mask.shape}")
    expected = output_size(kind, level, mask.shape[0], mask.shape[1])
    size = expected if size is None else (int(size[0]), int(size[1]))
    if size == mask.shape:
        return mask.copy()
    if not any(step == "resize" for step, _ in _steps(kind, level)):
        raise ValueError(f"{kind} {level} keeps the image size {mask.shape}, but size {size} was given")
    return resize_mask(mask, *size)


def level_key(level):
    """The text of a level in robustness.json and on the command line: 90, 0.78, resize0.5+jpeg75."""
    if isinstance(level, str):
        return level
    if isinstance(level, (int, np.integer)):
        return str(int(level))
    return f"{level:g}"


def parse_level(kind, text):
    """The level of ``SWEEPS[kind]`` that ``text`` names ("90", "90.0", "0.5"); ValueError naming
    the kind, the text and the known levels when there is none."""
    _check_kind(kind)
    levels = SWEEPS[kind]
    known = ", ".join(level_key(level) for level in levels)
    text = str(text).strip()
    for level in levels:
        if isinstance(level, str):
            if text == level:
                return level
            continue
        try:
            if float(text) == float(level):
                return level
        except ValueError:
            break
    raise ValueError(f"unknown level {text!r} for {kind} (levels: {known})")
