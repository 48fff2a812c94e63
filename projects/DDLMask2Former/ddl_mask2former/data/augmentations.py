"""Augmentations of the paper (sec. 4.1), as detectron2 Augmentations.

The paper follows MMSegmentation's pipeline: keep-ratio resize to a base scale of 2048x512
times a random ratio in [0.5, 2.0], random 512x512 crop, random horizontal flip, photometric
distortion, then padding to the crop size. Its random crop re-draws the window (up to 10 times)
until no single class covers more than ``cat_max_ratio`` (0.75) of it; ``CategoryAreaCrop``
does the same (detectron2's RandomCrop_CategoryAreaConstraint, with each candidate counted in
by a bincount). detectron2's RandomCrop and RandomFlip are used as they are; the
resize, the photometric distortion and the padding are written here.
Every geometric step is a detectron2 Transform, so the forgery mask follows the image
exactly (nearest-neighbour for the mask); photometric steps touch only the image.

In training the resize and the crop run as one step (``BaseScaleResizeCrop``): the crop window is
drawn on the resized mask as before, and only the window's pixels of the image are resampled. A
2.0x resize of a 1920x1080 image makes 1.9 M pixels of which the 512x512 crop keeps 0.26 M.

Degradation (INPUT.DEGRADATION, beyond the paper, off by default): ``RandomDegradation`` imitates
what an image goes through when shared -- rescaling, Gaussian blur, Gaussian noise, JPEG
recompression -- so that a model survives them. Its geometric half (``DegradationBeforeCrop``,
``RescaleTransform``: OpenCV INTER_AREA shrinking / INTER_LINEAR enlarging, the mask by
``resize_mask``, nearest neighbour at pixel centres) runs on the decoded image before the resize
and crop, so the crop size is unchanged; its photometric half (``DegradationAfterCrop``:
``GaussianBlurTransform``, ``GaussianNoiseTransform``, ``JpegTransform``) runs on the final crop
and leaves the mask as it is.
"""
import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import PadTransform
from PIL import Image

from ddl_mask2former_serve.images import base_scale_size

from .perturbations import gaussian_blur, jpeg_compress, resize_mask, resized_size

__all__ = ["BaseScaleResize", "BaseScaleResizeCrop", "CategoryAreaCrop", "ResizedCropTransform",
           "PhotometricDistortion", "PadToSize", "base_scale_size", "RandomDegradation",
           "DegradationBeforeCrop", "DegradationAfterCrop", "RescaleTransform",
           "GaussianBlurTransform", "GaussianNoiseTransform", "JpegTransform"]


class BaseScaleResize(T.Augmentation):
    """Keep-ratio resize to ``base_scale`` times a ratio drawn uniformly from ``ratio_range``."""

    def __init__(self, base_scale=(2048, 512), ratio_range=(1.0, 1.0), interp=Image.BILINEAR,
                 enlarge=True):
        super().__init__()
        if len(base_scale) != 2 or min(base_scale) <= 0:
            raise ValueError(f"base_scale must be two positive sizes, got {base_scale}")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self._init(locals())

    def get_transform(self, image):
        height, width = image.shape[:2]
        low, high = self.ratio_range
        ratio = np.random.uniform(low, high) if high > low else low
        new_h, new_w = base_scale_size(height, width, self.base_scale, ratio, self.enlarge)
        if (new_h, new_w) == (height, width):
            return T.NoOpTransform()
        return T.ResizeTransform(height, width, new_h, new_w, self.interp)


class CategoryAreaCrop(T.Augmentation):
    """Random crop of ``crop_size`` (H, W) that prefers windows holding several classes.

    Draws up to ``max_tries`` uniformly placed windows and keeps the first in which at least two
    classes are present and none covers ``single_category_max_area`` or more of the pixels
    (``ignored_category`` not counted); if none qualifies, the last draw is kept. This is
    MMSegmentation's ``cat_max_ratio`` and detectron2's ``RandomCrop_CategoryAreaConstraint``.
    With ``single_category_max_area >= 1`` it is a plain random crop. Images smaller than the
    crop are cropped to their own size along that side (PadToSize pads them afterwards).
    A mask with a single class (a real image) cannot qualify, so it takes one draw only: the
    result is the same uniform window either way.
    """

    def __init__(self, crop_size, single_category_max_area=1.0, ignored_category=255, max_tries=10):
        super().__init__()
        if not 0.0 < single_category_max_area:
            raise ValueError(f"single_category_max_area must be > 0, got {single_category_max_area}")
        self._init(locals())

    def get_transform(self, image, sem_seg):
        height, width = sem_seg.shape[:2]
        crop_h, crop_w = min(self.crop_size[0], height), min(self.crop_size[1], width)
        mixed = self.single_category_max_area < 1.0 and len(self._category_counts(sem_seg)) > 1
        tries = self.max_tries if mixed else 1
        for _ in range(tries):
            y0 = np.random.randint(height - crop_h + 1)
            x0 = np.random.randint(width - crop_w + 1)
            if tries == 1:
                break
            counts = self._category_counts(sem_seg[y0:y0 + crop_h, x0:x0 + crop_w])
            if (counts > 0).sum() > 1 and counts.max() < counts.sum() * self.single_category_max_area:
                break
        return T.CropTransform(x0, y0, crop_w, crop_h)

    def _category_counts(self, sem_seg):
        """Pixels per category present, the ignored one left out (bincount: labels are small ints)."""
        counts = np.bincount(sem_seg.ravel())
        if self.ignored_category is not None and self.ignored_category < len(counts):
            counts[self.ignored_category] = 0
        return counts[counts > 0]


class ResizedCropTransform(T.Transform):
    """A resize from (h, w) to (new_h, new_w), then the crop (x0, y0, crop_w, crop_h) of the result.

    The same as detectron2's ``ResizeTransform`` followed by ``CropTransform``, except that a
    uint8 image resamples only the crop's source box (Pillow's ``resize(box=...)``): the output
    pixels sit at the same positions with the same filter, but Pillow derives the filter
    coordinates from the box, so a pixel may round to a neighbouring gray level (at most 2 apart
    after the two resampling passes). The segmentation is resized whole with nearest neighbour and
    then cropped, so it equals the two-step result exactly.
    """

    def __init__(self, h, w, new_h, new_w, x0, y0, crop_w, crop_h, interp=Image.BILINEAR):
        super().__init__()
        if not (0 <= x0 and x0 + crop_w <= new_w and 0 <= y0 and y0 + crop_h <= new_h):
            raise ValueError(f"crop ({x0}, {y0}, {crop_w}, {crop_h}) is outside the resized "
                             f"{new_w}x{new_h} (WxH) image")
        self._set_attributes(locals())

    def _resize(self):
        return T.ResizeTransform(self.h, self.w, self.new_h, self.new_w, self.interp)

    def _crop(self):
        return T.CropTransform(self.x0, self.y0, self.crop_w, self.crop_h)

    def apply_image(self, img):
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(f"ResizedCropTransform expects a {self.w}x{self.h} (WxH) image, got "
                             f"{img.shape[1]}x{img.shape[0]}")
        if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
            return self._crop().apply_image(self._resize().apply_image(img))
        scale_x, scale_y = self.w / self.new_w, self.h / self.new_h
        box = (self.x0 * scale_x, self.y0 * scale_y,
               (self.x0 + self.crop_w) * scale_x, (self.y0 + self.crop_h) * scale_y)
        return np.asarray(Image.fromarray(img).resize((self.crop_w, self.crop_h), self.interp, box=box))

    def apply_segmentation(self, segmentation):
        return self._crop().apply_segmentation(self._resize().apply_segmentation(segmentation))

    def apply_coords(self, coords):
        return self._crop().apply_coords(self._resize().apply_coords(coords))


class BaseScaleResizeCrop(T.Augmentation):
    """``resize`` (a BaseScaleResize) then ``crop`` (a CategoryAreaCrop), resampling only the crop.

    Draws the same random numbers in the same order as the two augmentations one after the
    other (the ratio, then the windows, chosen on the resized mask), so with the same seed it
    picks the same window; the result is a ``ResizedCropTransform``.
    """

    def __init__(self, resize, crop):
        super().__init__()
        self._init(locals())

    def get_transform(self, image, sem_seg):
        resize = self.resize.get_transform(image)
        if isinstance(resize, T.NoOpTransform):
            return self.crop.get_transform(image, sem_seg)
        window = self.crop.get_transform(None, resize.apply_segmentation(sem_seg))
        return ResizedCropTransform(resize.h, resize.w, resize.new_h, resize.new_w,
                                    window.x0, window.y0, window.w, window.h, resize.interp)


def _distort_photometric(image, brightness, contrast, contrast_first, saturation, hue):
    """Apply the drawn photometric changes to a uint8 RGB image (None = skip that change)."""
    result = image.astype(np.float32)
    if brightness is not None:
        result = np.clip(result + brightness, 0, 255)
    if contrast is not None and contrast_first:
        result = np.clip(result * contrast, 0, 255)
    if saturation is not None or hue is not None:
        hsv = cv2.cvtColor(result.astype(np.uint8), cv2.COLOR_RGB2HSV)
        if saturation is not None:
            hsv[:, :, 1] = np.clip(hsv[:, :, 1].astype(np.float32) * saturation, 0, 255).astype(np.uint8)
        if hue is not None:
            # OpenCV 8-bit hue runs over 0..179 for a full circle.
            hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int32) + hue) % 180).astype(np.uint8)
        result = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
    if contrast is not None and not contrast_first:
        result = np.clip(result * contrast, 0, 255)
    return result.astype(np.uint8)


class PhotometricDistortion(T.Augmentation):
    """Random brightness, contrast, saturation and hue (MMSegmentation's PhotoMetricDistortion).

    Each change happens with probability ``prob``: brightness adds a value in
    [-brightness_delta, brightness_delta]; contrast and saturation multiply by a factor from
    their ranges; hue shifts by up to ``hue_delta`` in OpenCV 8-bit hue units (180 = full
    circle). Contrast goes before or after the HSV changes with equal chance. Input must be
    uint8 RGB (the mapper converts BGR around it); masks are unchanged.
    """

    def __init__(self, brightness_delta=32, contrast_range=(0.5, 1.5),
                 saturation_range=(0.5, 1.5), hue_delta=18, prob=0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"PhotometricDistortion needs a uint8 HxWx3 image, got "
                             f"{image.dtype} {image.shape}")
        draw = np.random.rand(4) < self.prob
        brightness = np.random.uniform(-self.brightness_delta, self.brightness_delta) if draw[0] else None
        contrast = np.random.uniform(*self.contrast_range) if draw[1] else None
        contrast_first = bool(np.random.rand() < 0.5)
        saturation = np.random.uniform(*self.saturation_range) if draw[2] else None
        hue = int(np.random.randint(-self.hue_delta, self.hue_delta + 1)) if draw[3] else None
        if brightness is None and contrast is None and saturation is None and hue is None:
            return T.NoOpTransform()
        return T.ColorTransform(
            lambda img: _distort_photometric(img, brightness, contrast, contrast_first,
                                             saturation, hue))


class PadToSize(T.Augmentation):
    """Pad bottom/right up to ``size`` (H, W): image with ``pad_value``, mask with ``seg_pad_value``."""

    def __init__(self, size, pad_value=0, seg_pad_value=255):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        height, width = image.shape[:2]
        pad_h = max(0, self.size[0] - height)
        pad_w = max(0, self.size[1] - width)
        if pad_h == 0 and pad_w == 0:
            return T.NoOpTransform()
        return PadTransform(0, 0, pad_w, pad_h, width, height, self.pad_value, self.seg_pad_value)


# --- Degradation (INPUT.DEGRADATION): what images go through when they are shared, so that a
# trained model survives recompression, resizing, blur and noise. ---------------------------


def _check_prob(name, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def _check_range(name, value_range, minimum, integer=False):
    if len(value_range) != 2 or not minimum <= value_range[0] <= value_range[1]:
        raise ValueError(f"{name} must be (low, high) with {minimum} <= low <= high, got {value_range}")
    if integer and any(int(v) != v for v in value_range):
        raise ValueError(f"{name} must hold integers, got {value_range}")


class _ImageOnlyTransform(T.Transform):
    """A change of pixel values only: segmentation and coordinates pass through unchanged."""

    def apply_segmentation(self, segmentation):
        return segmentation

    def apply_coords(self, coords):
        return coords

    def inverse(self):
        return T.NoOpTransform()


class RescaleTransform(T.Transform):
    """Resample (h, w) to (new_h, new_w) with OpenCV and keep that size.

    The image uses INTER_AREA when no side grows (the usual anti-aliased shrink) and
    INTER_LINEAR otherwise; the segmentation follows with ``perturbations.resize_mask`` (nearest
    neighbour at pixel centres, the rule of every mask resize), so a 0/1 mask stays exactly 0/1.
    """

    def __init__(self, h, w, new_h, new_w):
        super().__init__()
        self._set_attributes(locals())

    def _check(self, array):
        if array.shape[:2] != (self.h, self.w):
            raise ValueError(f"RescaleTransform expects a {self.w}x{self.h} (WxH) input, got "
                             f"{array.shape[1]}x{array.shape[0]}")

    def apply_image(self, img):
        self._check(img)
        shrink = self.new_h <= self.h and self.new_w <= self.w
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        return cv2.resize(img, (self.new_w, self.new_h), interpolation=interp)

    def apply_segmentation(self, segmentation):
        self._check(segmentation)
        return resize_mask(segmentation, self.new_h, self.new_w)

    def apply_coords(self, coords):
        coords[:, 0] = coords[:, 0] * (self.new_w * 1.0 / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h * 1.0 / self.h)
        return coords

    def inverse(self):
        return RescaleTransform(self.new_h, self.new_w, self.h, self.w)


class GaussianBlurTransform(_ImageOnlyTransform):
    """cv2.GaussianBlur with a ``ksize`` x ``ksize`` kernel; sigma follows from the size
    (OpenCV: 0.3 * ((ksize - 1) / 2 - 1) + 0.8, i.e. 0.8 / 1.1 / 1.4 for 3 / 5 / 7)."""

    def __init__(self, ksize):
        super().__init__()
        if ksize < 1 or ksize % 2 == 0:
            raise ValueError(f"Gaussian blur kernel size must be odd and positive, got {ksize}")
        self._set_attributes(locals())

    def apply_image(self, img):
        return gaussian_blur(img, self.ksize)


class GaussianNoiseTransform(_ImageOnlyTransform):
    """Add zero-mean Gaussian noise of standard deviation ``std`` (8-bit units), round, clip.

    The noise comes from its own generator seeded with ``seed`` (drawn by the augmentation
    from numpy's global RNG), so applying the transform twice gives the same pixels.
    """

    def __init__(self, std, seed):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        noise = np.random.default_rng(self.seed).standard_normal(img.shape, dtype=np.float32)
        noisy = img.astype(np.float32) + noise * np.float32(self.std)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


class JpegTransform(_ImageOnlyTransform):
    """JPEG-encode at ``quality`` (cv2.imencode, 4:2:0) and decode again.

    The JPEG block grid starts ``offset_y``/``offset_x`` pixels (0-15) above/left of the
    image: it is edge-padded by the offset before encoding and cropped back after decoding,
    so the 8x8 (16x16 chroma) grid is not always aligned with the crop's corner, as when
    a recompressed image is cropped at an arbitrary position. Input: uint8 RGB (or gray).
    """

    def __init__(self, quality, offset_y=0, offset_x=0):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        if img.dtype != np.uint8:
            raise ValueError(f"JpegTransform needs a uint8 image, got {img.dtype}")
        padded = cv2.copyMakeBorder(img, self.offset_y, 0, self.offset_x, 0, cv2.BORDER_REPLICATE)
        return jpeg_compress(padded, self.quality)[self.offset_y:, self.offset_x:]


class RandomDegradation:
    """The degradation policy of INPUT.DEGRADATION; its two halves are the Augmentations.

    With probability ``prob`` a training sample is degraded; a degraded sample then gets each
    operation independently with its own probability:

    * rescaling by a factor from ``rescale_range`` (``RescaleTransform``: the sample keeps the
      new size) -- geometric, applied by ``before_crop``;
    * Gaussian blur with an odd kernel size from ``blur_kernel_range``, Gaussian noise with a
      variance from ``noise_var_range`` (8-bit units: std = sqrt(variance)), JPEG
      recompression at a quality from ``jpeg_quality_range`` (integers, both ends included),
      in that order (compression last, as when an image is shared) -- photometric, applied
      by ``after_crop`` to the final crop; the mask is unchanged.

    ``before_crop`` draws every random number of the sample (the gate, then each operation's
    decision and parameters) from numpy's global RNG, which detectron2 seeds per data-loader
    worker, and keeps the photometric part for ``after_crop`` of the same sample: one chain,
    one gate, and a fixed seed gives the same sample. Used alone, ``after_crop`` draws its own
    gate and photometric part. Nothing is drawn when ``prob`` is 0.
    """

    def __init__(self, prob=0.5, rescale_prob=0.5, rescale_range=(0.5, 1.5), blur_prob=0.5,
                 blur_kernel_range=(3, 7), noise_prob=0.5, noise_var_range=(3.0, 23.0),
                 jpeg_prob=0.5, jpeg_quality_range=(50, 100)):
        for name, value in [("prob", prob), ("rescale_prob", rescale_prob), ("blur_prob", blur_prob),
                            ("noise_prob", noise_prob), ("jpeg_prob", jpeg_prob)]:
            _check_prob(name, value)
        _check_range("rescale_range", rescale_range, 1e-3)
        _check_range("blur_kernel_range", blur_kernel_range, 1, integer=True)
        if any(int(k) % 2 == 0 for k in blur_kernel_range):
            raise ValueError(f"blur_kernel_range must hold odd kernel sizes, got {blur_kernel_range}")
        _check_range("noise_var_range", noise_var_range, 0.0)
        _check_range("jpeg_quality_range", jpeg_quality_range, 1, integer=True)
        if jpeg_quality_range[1] > 100:
            raise ValueError(f"jpeg_quality_range must lie in [1, 100], got {jpeg_quality_range}")
        self.prob = float(prob)
        self.rescale_prob, self.rescale_range = float(rescale_prob), tuple(float(v) for v in rescale_range)
        self.blur_prob, self.blur_kernel_range = float(blur_prob), tuple(int(k) for k in blur_kernel_range)
        self.noise_prob, self.noise_var_range = float(noise_prob), tuple(float(v) for v in noise_var_range)
        self.jpeg_prob, self.jpeg_quality_range = float(jpeg_prob), tuple(int(q) for q in jpeg_quality_range)
        self.before_crop = DegradationBeforeCrop(self)
        self.after_crop = DegradationAfterCrop(self)
        self._pending = None

    def __repr__(self):
        return (f"RandomDegradation(prob={self.prob}, rescale_prob={self.rescale_prob}, "
                f"rescale_range={self.rescale_range}, blur_prob={self.blur_prob}, "
                f"blur_kernel_range={self.blur_kernel_range}, noise_prob={self.noise_prob}, "
                f"noise_var_range={self.noise_var_range}, jpeg_prob={self.jpeg_prob}, "
                f"jpeg_quality_range={self.jpeg_quality_range})")

    @staticmethod
    def _happens(prob):
        """One draw for a probability strictly between 0 and 1; none for 0 or 1."""
        if prob <= 0.0 or prob >= 1.0:
            return prob >= 1.0
        return bool(np.random.rand() < prob)

    @staticmethod
    def _uniform(low, high):
        return float(np.random.uniform(low, high)) if high > low else float(low)

    def _draw_rescale(self):
        if not self._happens(self.rescale_prob):
            return None
        return self._uniform(*self.rescale_range)

    def _draw_photometric(self):
        """[Transform] of blur, noise, JPEG (each present or not), in the order they apply."""
        transforms = []
        if self._happens(self.blur_prob):
            low, high = self.blur_kernel_range
            transforms.append(GaussianBlurTransform(low + 2 * int(np.random.randint((high - low) // 2 + 1))))
        if self._happens(self.noise_prob):
            std = float(np.sqrt(self._uniform(*self.noise_var_range)))
            transforms.append(GaussianNoiseTransform(std, int(np.random.randint(2**31 - 1))))
        if self._happens(self.jpeg_prob):
            low, high = self.jpeg_quality_range
            quality = int(np.random.randint(low, high + 1))
            offset_y, offset_x = (int(v) for v in np.random.randint(16, size=2))
            transforms.append(JpegTransform(quality, offset_y, offset_x))
        return transforms

    def draw_before_crop(self):
        """Draw the sample's chain; return its rescale factor (None: no rescaling)."""
        self._pending = None
        if not self._happens(self.prob):
            self._pending = []
            return None
        factor = self._draw_rescale()
        self._pending = self._draw_photometric()
        return factor

    def take_after_crop(self):
        """The photometric transforms drawn by ``before_crop`` for this sample (drawn now if none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            pending = self._draw_photometric() if self._happens(self.prob) else []
        return pending


class _DegradationHalf(T.Augmentation):
    """One half of a ``RandomDegradation``; both halves share the policy's draws for a sample."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def __repr__(self):
        return f"{type(self).__name__}({self.policy!r})"


class DegradationBeforeCrop(_DegradationHalf):
    """First half of a ``RandomDegradation``: draws the sample's chain, rescales (geometric)."""

    def get_transform(self, image):
        factor = self.policy.draw_before_crop()
        if factor is None:
            return T.NoOpTransform()
        height, width = image.shape[:2]
        new_h, new_w = resized_size(height, width, factor)
        if (new_h, new_w) == (height, width):
            return T.NoOpTransform()
        return RescaleTransform(height, width, new_h, new_w)


class DegradationAfterCrop(_DegradationHalf):
    """Second half of a ``RandomDegradation``: blur, noise, JPEG on the final crop (image only)."""

    def get_transform(self, image):
        transforms = self.policy.take_after_crop()
        if not transforms:
            return T.NoOpTransform()
        if image.dtype != np.uint8:
            raise ValueError(f"degradation needs a uint8 image, got {image.dtype}")
        return T.TransformList(transforms)
