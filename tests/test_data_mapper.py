"""DDLDatasetMapper: augmentations keep image and forgery mask aligned; test-time sizes."""
import cv2
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T

from data_helpers import write_image
from model_helpers import ddl_cfg
from ddl_mask2former.data import (
    IGNORE_VALUE, BaseScaleResize, DDLDatasetMapper, PadToSize, PhotometricDistortion,
    base_scale_size)
from ddl_mask2former.data.augmentations import BaseScaleResizeCrop, CategoryAreaCrop, ResizedCropTransform

RED, GRAY = (220, 30, 30), (90, 90, 90)


def _pattern_sample(tmp_path, height=60, width=90):
    """An image that is red exactly where its mask is forged: an off-centre L shape."""
    forged = np.zeros((height, width), bool)
    forged[8:40, 10:22] = True
    forged[30:40, 10:55] = True
    image = np.empty((height, width, 3), np.uint8)
    image[:] = GRAY
    image[forged] = RED
    image_path = write_image(str(tmp_path / "fake" / "f.png"), image)
    mask_path = write_image(str(tmp_path / "masks" / "f.png"), forged.astype(np.uint8) * 255)
    return {"file_name": image_path, "image_id": "fake/f.png", "height": height, "width": width,
            "label": 1, "mask_file": mask_path}


def _cfg(**overrides):
    return ddl_cfg(**{"INPUT.BASE_SCALE": (128, 64), "INPUT.CROP.SIZE": (48, 48), **overrides})


def test_mask_stays_on_pattern_under_scale_crop_flip(tmp_path):
    sample = _pattern_sample(tmp_path)
    mapper = DDLDatasetMapper(_cfg(**{"INPUT.PHOTOMETRIC.ENABLED": False}), is_train=True)
    np.random.seed(0)
    for _ in range(40):
        out = mapper(sample)
        image = out["image"].permute(1, 2, 0).numpy().astype(int)
        mask = out["forgery_mask"].numpy()
        assert image.shape[:2] == mask.shape == (48, 48)
        assert set(np.unique(mask)) <= {0, 1, IGNORE_VALUE}
        red = (image[:, :, 0] > 155) & (image[:, :, 1] < 60)
        gray = np.abs(image - np.array(GRAY)).max(axis=2) <= 2
        # Bilinear resizing mixes colours on region borders; the interior must agree.
        assert (red & (mask == 0)).sum() <= 0.02 * mask.size
        assert (gray & (mask == 1)).sum() == 0
        if (mask == 1).any():
            assert red[mask == 1].mean() > 0.6
        assert np.all(image[mask == IGNORE_VALUE] == 0)


def test_flip_moves_image_and_mask_together(tmp_path):
    sample = _pattern_sample(tmp_path)
    mapper = DDLDatasetMapper(True, augmentations=[T.RandomFlip(prob=1.0)])
    out = mapper(sample)
    mask = out["forgery_mask"].numpy()
    red = out["image"].permute(1, 2, 0).numpy()[:, :, 0] == RED[0]
    np.testing.assert_array_equal(red, mask == 1)
    assert mask[8:40, -22:-10].all() and not mask[8:40, 10:22].any()


def test_resize_ratio_and_padding(tmp_path):
    sample = _pattern_sample(tmp_path, height=60, width=90)
    for ratio in (0.5, 2.0):
        mapper = DDLDatasetMapper(True, augmentations=[
            BaseScaleResize((128, 64), (ratio, ratio)), PadToSize((200, 200))])
        out = mapper(sample)
        height, width = base_scale_size(60, 90, (128, 64), ratio)
        mask = out["forgery_mask"].numpy()
        assert mask.shape == (200, 200)
        assert np.all(mask[height:] == IGNORE_VALUE) and np.all(mask[:, width:] == IGNORE_VALUE)
        assert np.all(mask[:height, :width] != IGNORE_VALUE)
        assert out["image"][:, height:].sum() == 0
        # The forged fraction of the un-padded area survives the resize (nearest vs bilinear).
        forged = (mask[:height, :width] == 1).mean()
        assert abs(forged - (32 * 12 + 10 * 33) / (60 * 90)) < 0.05


def test_base_scale_size_follows_long_and_short_limits():
    assert base_scale_size(400, 600, (2048, 512)) == (512, 768)  # short side binds
    assert base_scale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side binds
    assert base_scale_size(1024, 1024, (2048, 512), ratio=0.5) == (256, 256)


def test_photometric_changes_image_only(tmp_path):
    sample = _pattern_sample(tmp_path)
    mapper = DDLDatasetMapper(True, augmentations=[PhotometricDistortion(prob=1.0)])
    np.random.seed(3)
    out = mapper(sample)
    reference = DDLDatasetMapper(True, augmentations=[])(sample)
    assert not torch.equal(out["image"], reference["image"])
    assert torch.equal(out["forgery_mask"], reference["forgery_mask"])
    assert out["image"].dtype == torch.uint8


def test_real_image_mask_is_all_zero_plus_padding(tmp_path):
    path = write_image(str(tmp_path / "r.png"), np.full((30, 20, 3), 77, np.uint8))
    mapper = DDLDatasetMapper(_cfg(), is_train=True)
    out = mapper({"file_name": path, "image_id": "r", "height": 30, "width": 20, "label": 0})
    mask = out["forgery_mask"].numpy()
    assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, IGNORE_VALUE}
    assert (mask == 0).any()
    assert out["label"] == 0 and (out["height"], out["width"]) == (30, 20)


def test_test_time_mapper_base_scale_and_original_size(tmp_path):
    sample = _pattern_sample(tmp_path, height=60, width=90)
    mapper = DDLDatasetMapper(_cfg(), is_train=False)
    out = mapper(sample)
    assert tuple(out["image"].shape) == (3,) + base_scale_size(60, 90, (128, 64))
    assert (out["height"], out["width"]) == (60, 90)
    assert out["label"] == 1 and out["mask_file"] == sample["mask_file"]
    assert "forgery_mask" not in out
    unlabeled = {k: sample[k] for k in ("file_name", "image_id", "height", "width")}
    assert "label" not in mapper(unlabeled)


def test_bgr_format_reverses_channels(tmp_path):
    sample = _pattern_sample(tmp_path)
    rgb = DDLDatasetMapper(_cfg(), is_train=False)(sample)["image"]
    bgr = DDLDatasetMapper(_cfg(**{"INPUT.FORMAT": "BGR"}), is_train=False)(sample)["image"]
    assert torch.equal(rgb.flip(0), bgr)


def test_config_rejects_relative_crops():
    with pytest.raises(ValueError, match="absolute"):
        DDLDatasetMapper(_cfg(**{"INPUT.CROP.TYPE": "relative_range"}), is_train=True)


def test_crop_disabled_keeps_resized_image(tmp_path):
    sample = _pattern_sample(tmp_path, height=60, width=90)
    cfg = _cfg(**{"INPUT.CROP.ENABLED": False, "INPUT.RATIO_RANGE": (1.0, 1.0),
                  "INPUT.RANDOM_FLIP": "none", "INPUT.PHOTOMETRIC.ENABLED": False})
    out = DDLDatasetMapper(cfg, is_train=True)(sample)
    assert tuple(out["forgery_mask"].shape) == base_scale_size(60, 90, (128, 64))


def test_base_scale_without_enlarging_keeps_small_images_native():
    assert base_scale_size(300, 400, (1024, 1024), enlarge=False) == (300, 400)
    assert base_scale_size(300, 400, (1024, 1024), enlarge=True) == (768, 1024)
    # Larger than the base scale: shrunk exactly as with enlarging; the ratio still applies.
    assert base_scale_size(2000, 1000, (1024, 1024), enlarge=False) == (1024, 512)
    assert base_scale_size(300, 400, (1024, 1024), ratio=0.5, enlarge=False) == (150, 200)


def test_crop_without_forged_pixels_is_labeled_real_for_detection(tmp_path):
    sample = _pattern_sample(tmp_path)  # forged pixels only in rows 8-40, columns 10-55
    kept = T.CropTransform(0, 0, 90, 60)
    clean = T.CropTransform(60, 45, 30, 15)  # bottom-right corner: authentic pixels only
    for crop_label_from_mask, crop, expected in [(True, kept, 1), (True, clean, 0),
                                                 (False, clean, 1)]:
        mapper = DDLDatasetMapper(True, augmentations=[_FixedTransform(crop)],
                                  crop_label_from_mask=crop_label_from_mask)
        assert mapper(sample)["label"] == expected


class _FixedTransform(T.Augmentation):
    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def get_transform(self, image):
        return self.transform


def _map_seeded(mapper, sample, seed):
    np.random.seed(seed)
    out = mapper(sample)
    return out["image"].numpy(), out["forgery_mask"].numpy(), out["label"]


def test_decoded_cache_gives_the_decoded_samples_and_stays_unchanged(tmp_path):
    sample = _pattern_sample(tmp_path)
    cfg = _cfg(**{"INPUT.CROP.SIZE": (32, 32)})
    plain = DDLDatasetMapper(cfg, is_train=True)
    cached = DDLDatasetMapper(_cfg(**{"INPUT.CROP.SIZE": (32, 32), "DATALOADER.DECODED_CACHE_MB": 1}),
                              is_train=True)
    for seed in range(12):  # photometric jitter, flips and crops all run on the cached arrays
        for a, b in zip(_map_seeded(plain, sample, seed), _map_seeded(cached, sample, seed)):
            np.testing.assert_array_equal(a, b)
    image, mask = cached.decoded_cache.get(sample["file_name"])
    assert not image.flags.writeable and not mask.flags.writeable
    assert cached.decoded_cache.used_bytes == image.nbytes + mask.nbytes == 60 * 90 * 4
    assert plain.decoded_cache.get(sample["file_name"]) is None


def test_decoded_cache_stops_at_its_budget(tmp_path):
    sample = _pattern_sample(tmp_path)
    # 60 x 90 x 4 bytes = 21,600 bytes do not fit in 0.01 MiB (10,485 bytes): decoded each time.
    mapper = DDLDatasetMapper(_cfg(**{"DATALOADER.DECODED_CACHE_MB": 0.01}), is_train=True)
    mapper(sample)
    assert mapper.decoded_cache.get(sample["file_name"]) is None
    assert mapper.decoded_cache.used_bytes == 0
    with pytest.raises(ValueError, match="DECODED_CACHE_MB"):
        DDLDatasetMapper(_cfg(**{"DATALOADER.DECODED_CACHE_MB": -1}), is_train=True)


def _resize_then_crop(image, h, w, new_h, new_w, x0, y0, crop_w, crop_h, segmentation=False):
    """detectron2's two transforms, one after the other: what ResizedCropTransform replaces."""
    resize, crop = T.ResizeTransform(h, w, new_h, new_w), T.CropTransform(x0, y0, crop_w, crop_h)
    if segmentation:
        return crop.apply_segmentation(resize.apply_segmentation(image))
    return crop.apply_image(resize.apply_image(image))


@pytest.mark.parametrize("ratio", [0.5, 0.8, 1.0, 1.4, 2.0])
def test_resized_crop_equals_resize_then_crop(ratio):
    rng = np.random.default_rng(int(ratio * 10))
    h, w = 270, 480  # a 16:9 image; the crop window is placed at random
    # Smooth content with noise on top, as a photo: every resampled pixel is a mix of several.
    image = cv2.resize(rng.integers(0, 256, (27, 48, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    mask = (rng.random((h // 10, w // 10)) > 0.6).astype(np.uint8).repeat(10, 0).repeat(10, 1)
    new_h, new_w = base_scale_size(h, w, (512, 128), ratio)
    crop_h, crop_w = min(96, new_h), min(128, new_w)
    for _ in range(5):
        y0, x0 = int(rng.integers(0, new_h - crop_h + 1)), int(rng.integers(0, new_w - crop_w + 1))
        args = (h, w, new_h, new_w, x0, y0, crop_w, crop_h)
        transform = ResizedCropTransform(*args)
        np.testing.assert_array_equal(transform.apply_segmentation(mask),
                                      _resize_then_crop(mask, *args, segmentation=True))
        fused = transform.apply_image(image).astype(int)
        reference = _resize_then_crop(image, *args).astype(int)
        assert fused.shape == reference.shape == (crop_h, crop_w, 3)
        # Same filter at the same positions; Pillow's coordinates from the box round apart rarely.
        difference = np.abs(fused - reference)
        assert difference.max() <= 2 and (difference > 0).mean() < 0.01
        gray = transform.apply_image(image[:, :, 1]).astype(int)
        assert np.abs(gray - _resize_then_crop(image[:, :, 1], *args)).max() <= 2
        # Other dtypes take the two-step path.
        floats = image.astype(np.float32)
        np.testing.assert_array_equal(transform.apply_image(floats), _resize_then_crop(floats, *args))
        coords = np.array([[0.0, 0.0], [w - 1.0, h - 1.0]])
        np.testing.assert_allclose(transform.apply_coords(coords.copy()),
                                   T.CropTransform(x0, y0, crop_w, crop_h).apply_coords(
                                       T.ResizeTransform(h, w, new_h, new_w).apply_coords(coords.copy())))


def test_resized_crop_rejects_windows_outside_the_resized_image():
    with pytest.raises(ValueError, match="outside"):
        ResizedCropTransform(100, 100, 50, 50, 10, 0, 48, 48)
    with pytest.raises(ValueError, match="expects a 100x100"):
        ResizedCropTransform(100, 100, 50, 50, 0, 0, 48, 48).apply_image(np.zeros((90, 100, 3), np.uint8))


# Resized at a random ratio; within the base scale and not enlarged (no resize, a plain crop).
@pytest.mark.parametrize("ratio_range,enlarge", [((0.5, 2.0), True), ((1.0, 1.0), False)])
def test_fused_resize_crop_draws_the_windows_of_the_two_steps(ratio_range, enlarge):
    """Same seed, same ratio and window as BaseScaleResize then CategoryAreaCrop; the mask equal."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    mask = np.zeros((90, 120), np.uint8)
    mask[20:50, 30:70] = 1
    resize = BaseScaleResize((256, 128), ratio_range, enlarge=enlarge)
    crop = CategoryAreaCrop((48, 48), 0.75)
    for seed in range(8):
        outputs = []
        for augmentations in ([BaseScaleResizeCrop(resize, crop)], [resize, crop]):
            np.random.seed(seed)
            aug_input = T.AugInput(image, sem_seg=mask)
            T.AugmentationList(augmentations)(aug_input)
            outputs.append((aug_input.image.astype(int), aug_input.sem_seg))
        (fused_image, fused_mask), (image_two_steps, mask_two_steps) = outputs
        np.testing.assert_array_equal(fused_mask, mask_two_steps)
        assert np.abs(fused_image - image_two_steps).max() <= 2


def test_training_mapper_resizes_and_crops_in_one_step():
    args = DDLDatasetMapper.from_config(_cfg(), is_train=True)
    assert isinstance(args["augmentations"][0], BaseScaleResizeCrop)
    assert not any(isinstance(a, BaseScaleResize) for a in args["augmentations"])
    no_crop = DDLDatasetMapper.from_config(_cfg(**{"INPUT.CROP.ENABLED": False}), is_train=True)
    assert isinstance(no_crop["augmentations"][0], BaseScaleResize)
