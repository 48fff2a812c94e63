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
"""
import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import PadTransform
from PIL import Image

__all__ = ["BaseScaleResize", "BaseScaleResizeCrop", "CategoryAreaCrop", "ResizedCropTransform",
           "PhotometricDistortion", "PadToSize", "base_scale_size"]


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
