"""INPUT.DEGRADATION: rescaling, blur, noise and JPEG of training samples (issue 23, item 2)."""
import cv2
import numpy as np
import pytest
from detectron2.data import transforms as T

from data_helpers import box_mask, write_image
from model_helpers import ddl_cfg
from ddl_mask2former.data import IGNORE_VALUE, DDLDatasetMapper, PadToSize, PhotometricDistortion
from ddl_mask2former.data.augmentations import (
    BaseScaleResize, BaseScaleResizeCrop, CategoryAreaCrop, DegradationAfterCrop,
    DegradationBeforeCrop, GaussianBlurTransform, GaussianNoiseTransform, JpegTransform,
    RandomDegradation, RescaleTransform)

ALL_OPS_OFF = {"rescale_prob": 0.0, "blur_prob": 0.0, "noise_prob": 0.0, "jpeg_prob": 0.0}


def _photo(height=60, width=90, seed=0):
    """Smooth content with noise on top, as a photo, and a 0/1 mask with a forged box."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 6, width // 6, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image + rng.integers(-10, 11, image.shape), 0, 255).astype(np.uint8)
    mask = (box_mask(height, width, (8, 40, 10, 56)) > 0).astype(np.uint8)
    return image, mask


def _degrade(policy, image, mask, seed=0):
    np.random.seed(seed)
    aug_input = T.AugInput(image, sem_seg=mask)
    T.AugmentationList([policy.before_crop, policy.after_crop])(aug_input)
    return aug_input.image, aug_input.sem_seg


def _sample(tmp_path, height=60, width=90):
    image, mask = _photo(height, width)
    image_path = write_image(str(tmp_path / "fake" / "f.png"), image)
    mask_path = write_image(str(tmp_path / "masks" / "f.png"), mask * 255)
    return {"file_name": image_path, "image_id": "fake/f.png", "height": height, "width": width,
            "label": 1, "mask_file": mask_path}


def _cfg(**overrides):
    return ddl_cfg(**{"INPUT.BASE_SCALE": (128, 64), "INPUT.CROP.SIZE": (48, 48), **overrides})


def _degradation_cfg(**overrides):
    forced = {"INPUT.DEGRADATION.ENABLED": True, "INPUT.DEGRADATION.PROB": 1.0,
              "INPUT.DEGRADATION.RESCALE_PROB": 1.0, "INPUT.DEGRADATION.BLUR_PROB": 1.0,
              "INPUT.DEGRADATION.NOISE_PROB": 1.0, "INPUT.DEGRADATION.JPEG_PROB": 1.0}
    return _cfg(**{**forced, **overrides})


def _map_seeded(mapper, sample, seed):
    np.random.seed(seed)
    out = mapper(sample)
    return out["image"].numpy(), out["forgery_mask"].numpy(), out["label"]


def test_config_defaults_are_off():
    degradation = ddl_cfg().INPUT.DEGRADATION
    assert degradation.ENABLED is False
    assert degradation.PROB == 0.5
    assert tuple(degradation.RESCALE_RANGE) == (0.5, 1.5)
    assert tuple(degradation.BLUR_KERNEL_RANGE) == (3, 7)
    assert tuple(degradation.NOISE_VAR_RANGE) == (3.0, 23.0)
    assert tuple(degradation.JPEG_QUALITY_RANGE) == (50, 100)


@pytest.mark.parametrize("op", ["blur", "noise", "jpeg"])
def test_forced_photometric_op_changes_the_image_only(op):
    image, mask = _photo()
    policy = RandomDegradation(prob=1.0, **{**ALL_OPS_OFF, f"{op}_prob": 1.0})
    out_image, out_mask = _degrade(policy, image, mask)
    assert out_image.dtype == np.uint8 and out_image.shape == image.shape
    changed = np.abs(out_image.astype(int) - image.astype(int))
    assert (changed > 0).mean() > 0.1
    np.testing.assert_array_equal(out_mask, mask)


def test_photometric_ops_draw_their_parameters_from_their_ranges():
    policy = RandomDegradation(prob=1.0, rescale_prob=0.0, blur_prob=1.0, blur_kernel_range=(3, 7),
                               noise_prob=1.0, noise_var_range=(3.0, 23.0), jpeg_prob=1.0,
                               jpeg_quality_range=(50, 100))
    kernels, qualities = set(), set()
    np.random.seed(0)
    for _ in range(200):
        assert policy.draw_before_crop() is None
        blur, noise, jpeg = policy.take_after_crop()  # always in this order
        assert isinstance(blur, GaussianBlurTransform) and isinstance(noise, GaussianNoiseTransform)
        assert isinstance(jpeg, JpegTransform)
        kernels.add(blur.ksize)
        qualities.add(jpeg.quality)
        assert 3.0 - 1e-9 <= noise.std ** 2 <= 23.0 + 1e-9
        assert 0 <= jpeg.offset_y < 16 and 0 <= jpeg.offset_x < 16
    assert kernels == {3, 5, 7}
    assert min(qualities) >= 50 and max(qualities) <= 100 and len(qualities) > 30


@pytest.mark.parametrize("factor,expected", [(0.5, (30, 45)), (1.5, (90, 135)), (0.7, (42, 63))])
def test_forced_rescale_resamples_mask_by_nearest_neighbour(factor, expected):
    image, mask = _photo()
    policy = RandomDegradation(prob=1.0, **{**ALL_OPS_OFF, "rescale_prob": 1.0},
                               rescale_range=(factor, factor))
    out_image, out_mask = _degrade(policy, image, mask)
    assert out_image.shape == expected + (3,) and out_mask.shape == expected
    assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) == {0, 1}
    # Nearest neighbour at pixel centres: output pixel i samples input floor((i + 0.5) * h / new_h).
    rows = np.minimum(((np.arange(expected[0]) + 0.5) * 60 / expected[0]).astype(int), 59)
    cols = np.minimum(((np.arange(expected[1]) + 0.5) * 90 / expected[1]).astype(int), 89)
    np.testing.assert_array_equal(out_mask, mask[rows][:, cols])
    # The image is resampled with OpenCV: INTER_AREA to shrink, INTER_LINEAR to enlarge.
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    np.testing.assert_array_equal(out_image, cv2.resize(image, expected[::-1], interpolation=interp))


def test_rescaled_mask_stays_on_its_image_content():
    # Red exactly where forged: after rescaling, the forged pixels of the mask are red.
    mask = (box_mask(60, 90, (8, 40, 10, 56)) > 0).astype(np.uint8)
    image = np.full((60, 90, 3), 90, np.uint8)
    image[mask == 1] = (220, 30, 30)
    for factor in (0.55, 0.8, 1.3):
        transform = RescaleTransform(60, 90, int(60 * factor + 0.5), int(90 * factor + 0.5))
        red = transform.apply_image(image)[:, :, 0] > 155
        forged = transform.apply_segmentation(mask) == 1
        # Only the region's border pixels mix colours.
        assert (red != forged).mean() < 0.03
        assert red[forged].mean() > 0.9


def test_rescale_transform_rejects_other_sizes_and_scales_coords():
    transform = RescaleTransform(60, 90, 30, 45)
    with pytest.raises(ValueError, match="expects a 90x60"):
        transform.apply_image(np.zeros((50, 90, 3), np.uint8))
    coords = transform.apply_coords(np.array([[90.0, 60.0]]))
    np.testing.assert_allclose(coords, [[45.0, 30.0]])
    assert (transform.inverse().new_h, transform.inverse().new_w) == (60, 90)


def test_transforms_are_deterministic_once_drawn():
    image, _ = _photo()
    for transform in (GaussianNoiseTransform(3.0, seed=7), JpegTransform(60, 5, 11),
                      GaussianBlurTransform(5)):
        np.testing.assert_array_equal(transform.apply_image(image), transform.apply_image(image))
    # The JPEG grid offset matters: another offset gives other pixels.
    assert not np.array_equal(JpegTransform(60, 0, 0).apply_image(image),
                              JpegTransform(60, 5, 11).apply_image(image))
    # Gray images are supported too.
    gray = JpegTransform(60, 3, 3).apply_image(image[:, :, 0])
    assert gray.shape == (60, 90) and gray.dtype == np.uint8


def test_gate_probability_zero_draws_nothing_and_changes_nothing():
    image, mask = _photo()
    policy = RandomDegradation(prob=0.0, rescale_prob=1.0, blur_prob=1.0, noise_prob=1.0, jpeg_prob=1.0)
    np.random.seed(3)
    out_image, out_mask = _degrade(policy, image, mask, seed=3)
    after = np.random.rand()
    np.random.seed(3)
    assert after == np.random.rand()
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_gate_probability_is_shared_by_both_halves():
    # One gate per sample: a sample is either not degraded at all or gets its whole chain.
    policy = RandomDegradation(prob=0.5, rescale_prob=1.0, blur_prob=1.0, noise_prob=1.0, jpeg_prob=1.0)
    np.random.seed(0)
    degraded = 0
    for _ in range(400):
        factor = policy.draw_before_crop()
        photometric = policy.take_after_crop()
        assert (factor is None) == (photometric == [])
        degraded += factor is not None
        assert policy.take_after_crop() is not None  # consumed; a standalone draw follows
    assert 150 < degraded < 250


@pytest.mark.parametrize("kwargs", [
    {"prob": 1.5}, {"jpeg_prob": -0.1}, {"rescale_range": (0.0, 1.0)}, {"rescale_range": (1.5, 0.5)},
    {"blur_kernel_range": (2, 6)}, {"blur_kernel_range": (3.5, 7)}, {"noise_var_range": (-1.0, 3.0)},
    {"jpeg_quality_range": (50, 101)}, {"jpeg_quality_range": (0, 100)}])
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        RandomDegradation(**kwargs)


def test_mapper_rescales_before_the_crop_and_degrades_the_crop_before_padding():
    augmentations = DDLDatasetMapper.from_config(_degradation_cfg(), is_train=True)["augmentations"]
    kinds = [type(a) for a in augmentations]
    assert kinds[:2] == [DegradationBeforeCrop, BaseScaleResizeCrop]
    assert kinds[-3:] == [PhotometricDistortion, DegradationAfterCrop, PadToSize]
    assert augmentations[0].policy is augmentations[-2].policy
    no_crop = DDLDatasetMapper.from_config(_degradation_cfg(**{"INPUT.CROP.ENABLED": False}), is_train=True)
    assert [type(a) for a in no_crop["augmentations"]][:2] == [DegradationBeforeCrop, BaseScaleResize]
    assert type(no_crop["augmentations"][-1]) is DegradationAfterCrop


def test_test_time_mapper_never_degrades(tmp_path):
    sample = _sample(tmp_path)
    for tiled in (False, True):
        cfg = _degradation_cfg(**{"TEST.TILE.ENABLED": tiled})
        augmentations = DDLDatasetMapper.from_config(cfg, is_train=False)["augmentations"]
        assert not any(isinstance(a, (DegradationBeforeCrop, DegradationAfterCrop)) for a in augmentations)
        plain = DDLDatasetMapper(_cfg(**{"TEST.TILE.ENABLED": tiled}), is_train=False)(sample)["image"]
        np.random.seed(0)
        assert np.array_equal(DDLDatasetMapper(cfg, is_train=False)(sample)["image"].numpy(), plain.numpy())


@pytest.mark.parametrize("forced", [True, False])
def test_fixed_seed_gives_the_same_degraded_sample(tmp_path, forced):
    sample = _sample(tmp_path)
    cfg = _degradation_cfg() if forced else _cfg(**{"INPUT.DEGRADATION.ENABLED": True})
    mapper = DDLDatasetMapper(cfg, is_train=True)
    undegraded = DDLDatasetMapper(_cfg(), is_train=True)
    differs = 0
    for seed in range(6):
        first, second = _map_seeded(mapper, sample, seed), _map_seeded(mapper, sample, seed)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)
        image, mask, _ = first
        # The crop size the network sees is unchanged; the mask stays 0/1 (+ padding).
        assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
        assert set(np.unique(mask)) <= {0, 1, IGNORE_VALUE}
        differs += not np.array_equal(image, _map_seeded(undegraded, sample, seed)[0])
    assert differs == 6 if forced else differs > 0
    # Another mapper built from the same config gives the same samples too (per-worker copies).
    other = DDLDatasetMapper(cfg, is_train=True)
    for a, b in zip(_map_seeded(mapper, sample, 11), _map_seeded(other, sample, 11)):
        np.testing.assert_array_equal(a, b)


def test_disabled_by_default_changes_nothing(tmp_path):
    sample = _sample(tmp_path)
    cfg = _cfg()
    assert not cfg.INPUT.DEGRADATION.ENABLED
    mapper = DDLDatasetMapper(cfg, is_train=True)
    assert not any(isinstance(a, (DegradationBeforeCrop, DegradationAfterCrop))
                   for a in mapper.augmentations.augs)
    # The pipeline as it was before degradation existed, written out.
    before = DDLDatasetMapper(True, augmentations=[
        BaseScaleResizeCrop(BaseScaleResize((128, 64), (0.5, 2.0)),
                            CategoryAreaCrop((48, 48), 1.0, ignored_category=IGNORE_VALUE)),
        T.RandomFlip(horizontal=True, vertical=False),
        PhotometricDistortion(),
        PadToSize((48, 48), pad_value=0, seg_pad_value=IGNORE_VALUE)], crop_label_from_mask=True)
    for seed in range(6):
        for a, b in zip(_map_seeded(mapper, sample, seed), _map_seeded(before, sample, seed)):
            np.testing.assert_array_equal(a, b)
