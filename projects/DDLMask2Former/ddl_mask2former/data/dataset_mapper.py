"""DDLDatasetMapper: a DDL dataset dict -> model input (image, label, forgery mask).

Training: decode the image (RGB, EXIF applied), read the forgery mask of a fake (> threshold
is forged) or use an all-zero mask for a real image, then apply BaseScaleResize with a random
ratio and CategoryAreaCrop (a random crop, re-drawn while one class dominates it when
INPUT.CROP.SINGLE_CATEGORY_MAX_AREA < 1) as one step that resamples only the crop
(BaseScaleResizeCrop), then RandomFlip, PhotometricDistortion and PadToSize. Output:
"image" uint8 (3, H, W) in cfg.INPUT.FORMAT, "label" int, "forgery_mask" uint8 (H, W) with
0 real / 1 forged / 255 ignore (padding), plus "file_name", "image_id", "height", "width"
(original size, as everywhere in detectron2).

Degradation (INPUT.DEGRADATION.ENABLED, training only, off by default): a RandomDegradation
draws, per sample, whether it is degraded (PROB) and which operations it gets. Rescaling acts
first, on the decoded image and mask, and the sample keeps the new size: the base-scale resize
and the crop then follow as usual, so the crop size the network sees does not change, and the
rescaling's loss of detail reaches the crop as a resize in the wild reaches the test mapper.
Blur, noise and JPEG (in that order) act on the final crop, after PhotometricDistortion and
before PadToSize: the cheapest place (only the crop's pixels), padding stays exactly 0, and
the JPEG grid starts at a random offset (0-15 px) from the crop's corner, as for an image
recompressed before it was cropped. They leave the mask unchanged.

Test / evaluation: resize to the base scale only (nothing with TEST.TILE.ENABLED: the model
tiles the native pixels); "height"/"width" stay the ORIGINAL size so
predictions can be resized back; "label" and "mask_file" pass through when present.

With decoded_cache_mb > 0 (training only) each process keeps the decoded image and forgery
mask of the first files it reads, up to that many MiB, and crops later epochs from memory: on a
small dataset (the CPU quickstart) PNG decoding is most of a sample's cost. Cached arrays are
read-only; augmentations never change their input in place.

With skip_bad_samples (training only) a sample whose files turn out unreadable is logged
with its file name, counted, appended to ``bad_files_dir/bad_files.txt`` (so that the trainer can
report every process's and worker's skips at the end) and dropped (the mapper returns None, and
detectron2's MapDataset then draws another sample); otherwise the DDLDataError propagates.
"""
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T

from .augmentations import (BaseScaleResize, BaseScaleResizeCrop, CategoryAreaCrop, PadToSize,
                            PhotometricDistortion, RandomDegradation)
from .ddl_dataset import record_bad_files
from .image_io import DDLDataError, read_forgery_mask, read_image

__all__ = ["DDLDatasetMapper", "IGNORE_VALUE"]

logger = logging.getLogger(__name__)

# forgery_mask value for padded pixels; losses and metrics ignore it.
IGNORE_VALUE = 255


def _to_tensor(array):
    array = np.ascontiguousarray(array)
    # Pillow-backed arrays are read-only; torch needs memory it may write.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class DDLDatasetMapper:
    """Map DDL dataset dicts to model inputs; see the module docstring for the output."""

    @configurable
    def __init__(self, is_train, *, augmentations, image_format="RGB", mask_threshold=127,
                 skip_bad_samples=False, crop_label_from_mask=False, decoded_cache_mb=0,
                 bad_files_dir=None):
        """
        Args:
            is_train: training (labels and masks required) or inference.
            augmentations: list of detectron2 Augmentations, applied in order to the image
                and (in training) the forgery mask.
            image_format: "RGB" or "BGR" channel order of the output image.
            mask_threshold: a mask pixel is forged when its 8-bit value is above this.
            skip_bad_samples: drop unreadable training samples (logged and counted).
            bad_files_dir: with skip_bad_samples, the folder whose bad_files.txt lists them.
            crop_label_from_mask: in training, a fake image's crop that keeps no forged pixel
                gets label 0 (its pixels are all authentic); the image's label otherwise.
            decoded_cache_mb: in training, keep decoded images and masks in this process's
                memory up to this many MiB (0: decode every time). Each data-loader worker
                holds its own cache.
        """
        if decoded_cache_mb < 0:
            raise ValueError(f"DATALOADER.DECODED_CACHE_MB must be >= 0, got {decoded_cache_mb}")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"DDLDatasetMapper supports image_format RGB or BGR, got {image_format!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.mask_threshold = mask_threshold
        self.skip_bad_samples = skip_bad_samples and is_train
        self.bad_files_dir = bad_files_dir
        self.crop_label_from_mask = crop_label_from_mask
        self.decoded_cache = DecodedCache(decoded_cache_mb if is_train else 0)
        # Per process: each data-loader worker counts its own skips.
        self.num_skipped = 0
        mode = "training" if is_train else "inference"
        logger.info("DDLDatasetMapper (%s) augmentations: %s", mode, augmentations)

    @classmethod
    def from_config(cls, cfg, is_train=True):
        base_scale = tuple(cfg.INPUT.BASE_SCALE)
        enlarge = cfg.INPUT.BASE_SCALE_ENLARGE
        if is_train:
            degradation = _degradation_from_config(cfg)
            resize = BaseScaleResize(base_scale, tuple(cfg.INPUT.RATIO_RANGE), enlarge=enlarge)
            if cfg.INPUT.CROP.ENABLED:
                if cfg.INPUT.CROP.TYPE != "absolute":
                    raise ValueError(f"DDL training crops are 'absolute' (H, W) sizes; "
                                     f"INPUT.CROP.TYPE is {cfg.INPUT.CROP.TYPE!r}")
                crop_size = tuple(int(s) for s in cfg.INPUT.CROP.SIZE)
                crop = CategoryAreaCrop(crop_size, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                                        ignored_category=IGNORE_VALUE)
                # One step: only the crop's pixels are resampled.
                augmentations = [BaseScaleResizeCrop(resize, crop)]
            else:
                augmentations = [resize]
            if degradation is not None:
                # Rescaling before the resize and crop: the crop size stays fixed.
                augmentations.insert(0, degradation.before_crop)
            if cfg.INPUT.RANDOM_FLIP != "none":
                augmentations.append(T.RandomFlip(
                    horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                    vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
            photometric = cfg.INPUT.PHOTOMETRIC
            if photometric.ENABLED:
                augmentations.append(PhotometricDistortion(
                    brightness_delta=photometric.BRIGHTNESS_DELTA,
                    contrast_range=tuple(photometric.CONTRAST_RANGE),
                    saturation_range=tuple(photometric.SATURATION_RANGE),
                    hue_delta=photometric.HUE_DELTA,
                    prob=photometric.PROB))
            if degradation is not None:
                # Blur, noise, JPEG on the final crop, before padding.
                augmentations.append(degradation.after_crop)
            if cfg.INPUT.CROP.ENABLED:
                augmentations.append(PadToSize(crop_size, pad_value=0, seg_pad_value=IGNORE_VALUE))
        elif cfg.TEST.TILE.ENABLED:
            # Tiled inference needs the native pixels: the model tiles them (TEST.TILE).
            augmentations = []
        else:
            augmentations = [BaseScaleResize(base_scale, enlarge=enlarge)]
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "mask_threshold": cfg.INPUT.MASK_THRESHOLD,
            "skip_bad_samples": cfg.DATALOADER.SKIP_BAD_SAMPLES,
            "bad_files_dir": cfg.OUTPUT_DIR if is_train else None,
            "crop_label_from_mask": cfg.INPUT.CROP_LABEL_FROM_MASK,
            "decoded_cache_mb": cfg.DATALOADER.DECODED_CACHE_MB,
        }

    def __call__(self, dataset_dict):
        try:
            return self._map(dataset_dict)
        except DDLDataError as exc:
            if not self.skip_bad_samples:
                raise
            self.num_skipped += 1
            logger.warning("skipping bad sample %s: %s (%d skipped so far in this process)",
                           exc.path, exc.problem, self.num_skipped)
            if self.bad_files_dir:
                record_bad_files(self.bad_files_dir, [(exc.path, exc.problem)], "training")
            return None

    def _map(self, dataset_dict):
        dataset_dict = copy.copy(dataset_dict)
        decoded = self.decoded_cache.get(dataset_dict["file_name"])
        if decoded is None:
            decoded = self.decoded_cache.put(dataset_dict["file_name"], *self._decode(dataset_dict))
        image, forgery_mask = decoded
        dataset_dict["height"], dataset_dict["width"] = image.shape[:2]

        aug_input = T.AugInput(image, sem_seg=forgery_mask)
        self.augmentations(aug_input)
        image = aug_input.image
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        dataset_dict["image"] = _to_tensor(image.transpose(2, 0, 1))
        if self.is_train:
            dataset_dict["forgery_mask"] = _to_tensor(aug_input.sem_seg)
            dataset_dict.pop("mask_file", None)
            if self.crop_label_from_mask and not (aug_input.sem_seg == 1).any():
                dataset_dict["label"] = 0
        return dataset_dict

    def _decode(self, dataset_dict):
        """(RGB image, forgery mask or None at test time), checked against the index."""
        file_name = dataset_dict["file_name"]
        # Photometric distortion assumes RGB, so decode RGB and reorder at the end.
        image = read_image(file_name, format="RGB")
        height, width = image.shape[:2]
        if "height" in dataset_dict and (dataset_dict["height"], dataset_dict["width"]) != (height, width):
            raise DDLDataError(file_name, f"decoded size {width}x{height} (WxH) differs from the "
                                          f"indexed size {dataset_dict['width']}x{dataset_dict['height']}; "
                                          f"was the file replaced after indexing?")
        forgery_mask = self._forgery_mask(dataset_dict, height, width) if self.is_train else None
        return image, forgery_mask

    def _forgery_mask(self, dataset_dict, height, width):
        if "label" not in dataset_dict:
            raise DDLDataError(dataset_dict["file_name"],
                               "training needs labeled images, but this dict has no 'label' "
                               "(an unlabeled test split?)")
        label = int(dataset_dict["label"])
        if label == 0:
            return np.zeros((height, width), np.uint8)
        if label != 1:
            raise DDLDataError(dataset_dict["file_name"], f"label must be 0 or 1, got {label}")
        mask_file = dataset_dict.get("mask_file")
        if not mask_file:
            raise DDLDataError(dataset_dict["file_name"], "fake image without a 'mask_file'")
        forged = read_forgery_mask(mask_file, self.mask_threshold)
        if forged.shape != (height, width):
            raise DDLDataError(mask_file, f"mask is {forged.shape[1]}x{forged.shape[0]} (WxH) but "
                                          f"its image {dataset_dict['file_name']} is {width}x{height}")
        return forged.astype(np.uint8)


def _degradation_from_config(cfg):
    """The RandomDegradation of INPUT.DEGRADATION, or None when it is disabled."""
    degradation = cfg.INPUT.DEGRADATION
    if not degradation.ENABLED:
        return None
    return RandomDegradation(
        prob=degradation.PROB,
        rescale_prob=degradation.RESCALE_PROB, rescale_range=tuple(degradation.RESCALE_RANGE),
        blur_prob=degradation.BLUR_PROB, blur_kernel_range=tuple(degradation.BLUR_KERNEL_RANGE),
        noise_prob=degradation.NOISE_PROB, noise_var_range=tuple(degradation.NOISE_VAR_RANGE),
        jpeg_prob=degradation.JPEG_PROB, jpeg_quality_range=tuple(degradation.JPEG_QUALITY_RANGE))


class DecodedCache:
    """File name -> (image, mask) arrays kept read-only in memory until ``budget_mb`` is used.

    No eviction: once full, later files are decoded every time, so memory stays bounded and a
    cached sample is exactly what decoding would give.
    """

    def __init__(self, budget_mb):
        self.budget_bytes = int(budget_mb * 2**20)
        self.used_bytes = 0
        self._arrays = {}

    def get(self, file_name):
        return self._arrays.get(file_name)

    def put(self, file_name, image, mask):
        size = image.nbytes + (mask.nbytes if mask is not None else 0)
        if self.used_bytes + size > self.budget_bytes:
            return image, mask
        for array in (image, mask):
            if array is not None:
                array.flags.writeable = False
        self._arrays[file_name] = (image, mask)
        self.used_bytes += size
        return image, mask
