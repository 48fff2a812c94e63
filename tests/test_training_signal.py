"""The training signal: crops that keep both classes, the two localization target forms and their
inference rule, and the trace strength of the synthetic difficulty levels."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loss_helpers import targets_per_image
from model_helpers import build, eval_inputs, tiny_cfg, training_batch
from ddl_mask2former.data.augmentations import CategoryAreaCrop
from ddl_mask2former.data.synthetic import (
    DIFFICULTIES, _capture, load_source_photos, make_fake_image, make_real_image, trace_profile)
from ddl_mask2former.modeling.meta_arch import DDLMask2Former

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fake_masks(count=24, seed=0, difficulty="hard"):
    photos = load_source_photos()
    masks = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        _image, mask, _meta = make_fake_image(rng, photos, 96, 160, difficulty=difficulty)
        masks.append(mask.astype(np.uint8))
    return masks


def _crop_statistics(masks, max_area, crop=48, draws=20):
    """Share of crops holding a forged pixel, and the median forged share of those crops."""
    np.random.seed(0)
    augmentation = CategoryAreaCrop((crop, crop), max_area)
    with_forgery, shares = 0, []
    for mask in masks:
        for _ in range(draws):
            window = augmentation.get_transform(None, mask).apply_segmentation(mask)
            assert window.shape == (crop, crop)
            if window.any():
                with_forgery += 1
                shares.append(window.mean())
    return with_forgery / (len(masks) * draws), float(np.median(shares))


def test_category_area_crop_keeps_more_forged_pixels_than_a_plain_crop():
    masks = _fake_masks()
    plain_rate, plain_share = _crop_statistics(masks, 1.0)
    constrained_rate, constrained_share = _crop_statistics(masks, 0.75)
    assert constrained_rate > plain_rate + 0.1
    assert constrained_share > plain_share


def test_category_area_crop_accepted_windows_respect_the_limit():
    mask = np.zeros((100, 100), np.uint8)
    mask[40:60, 40:60] = 1
    np.random.seed(1)
    augmentation = CategoryAreaCrop((32, 32), 0.75)
    accepted = 0
    for _ in range(200):
        window = augmentation.get_transform(None, mask).apply_segmentation(mask)
        share = window.mean()
        if 0 < share < 0.75:
            accepted += 1
    # 10 tries per crop find a mixed window almost always for a region this size.
    assert accepted > 180


def test_category_area_crop_single_class_and_small_images():
    real = np.zeros((40, 30), np.uint8)
    np.random.seed(2)
    transform = CategoryAreaCrop((64, 64), 0.75).get_transform(None, real)
    # Smaller than the crop: the whole image (padding is PadToSize's job).
    assert (transform.x0, transform.y0, transform.w, transform.h) == (0, 0, 30, 40)
    with pytest.raises(ValueError, match="single_category_max_area"):
        CategoryAreaCrop((8, 8), 0.0)


def test_mapper_uses_the_configured_crop_constraint():
    from ddl_mask2former.data import DDLDatasetMapper

    cfg = tiny_cfg()
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.75
    mapper_args = DDLDatasetMapper.from_config(cfg, is_train=True)
    # The crop runs inside the resize step (BaseScaleResizeCrop).
    crops = [a.crop for a in mapper_args["augmentations"] if isinstance(getattr(a, "crop", None), CategoryAreaCrop)]
    assert len(crops) == 1 and crops[0].single_category_max_area == 0.75


def _two_class_cfg():
    cfg = tiny_cfg()
    cfg.MODEL.DDL.TARGET_CLASSES = ["authentic", "forged"]
    return cfg


def test_two_class_targets_cover_authentic_and_forged_pixels():
    model = build(_two_class_cfg())
    batch = training_batch()
    batch[1]["forgery_mask"][0, 0] = 255  # one ignored pixel
    targets = targets_per_image(model._localization_targets(batch, (64, 64)))
    real, fake = targets
    assert real["labels"].tolist() == [0] and real["masks"][0].all()
    assert fake["labels"].tolist() == [0, 1]
    forged = batch[1]["forgery_mask"] == 1
    assert torch.equal(fake["masks"][1], forged)
    assert torch.equal(fake["masks"][0], ~forged & fake["valid"])
    assert not fake["masks"][:, 0, 0].any()
    one_class = targets_per_image(build(tiny_cfg())._localization_targets(training_batch(), (64, 64)))
    assert one_class[0]["masks"].shape[0] == 0 and one_class[1]["labels"].tolist() == [0]


def test_two_class_model_trains_and_infers_in_unit_range():
    model = build(_two_class_cfg())
    batch = training_batch()
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        outputs = model(eval_inputs(batch, 96, 80))
    for output in outputs:
        assert output["mask_prob"].shape == (96, 80)
        assert 0.0 <= output["mask_prob"].min() <= output["mask_prob"].max() <= 1.0
        assert torch.equal(output["mask"], output["mask_prob"] > 0.5)


def test_unknown_target_classes_are_rejected():
    cfg = tiny_cfg()
    cfg.MODEL.DDL.TARGET_CLASSES = ["forged", "authentic"]
    with pytest.raises(ValueError, match="TARGET_CLASSES"):
        build(cfg)


def test_inference_rule_for_one_and_two_classes():
    generator = torch.Generator().manual_seed(0)
    query_logits = torch.randn(5, 2, generator=generator) * 2
    mask_logits = torch.randn(5, 6, 7, generator=generator) * 3
    confidence, masks = query_logits.sigmoid(), mask_logits.sigmoid()
    forged = (confidence[:, 1, None, None] * masks).amax(0)
    authentic = (confidence[:, 0, None, None] * masks).amax(0)
    # One class: the max over queries of confidence x mask (unchanged from the first version).
    one = DDLMask2Former.combine_query_masks(query_logits[:, 1:], mask_logits, ("forged",))
    assert torch.allclose(one, forged)
    two = DDLMask2Former.combine_query_masks(query_logits, mask_logits, ("authentic", "forged"))
    assert torch.allclose(two, forged / (forged + authentic), atol=1e-6)
    assert 0.0 <= two.min() and two.max() <= 1.0
    assert torch.equal(two > 0.5, forged > authentic)


def _trace_contrast(difficulty, count=16):
    """Mean |log| ratio of high-pass energy inside vs just outside the forged regions."""
    photos = load_source_photos()
    ratios = []
    for index in range(count):
        rng = np.random.default_rng([7, index])
        image, mask, _meta = make_fake_image(rng, photos, 160, 200, difficulty=difficulty)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        residual = np.abs(cv2.Laplacian(gray, cv2.CV_32F))
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool) & ~mask
        if mask.sum() > 20 and ring.sum() > 20:
            ratios.append(abs(np.log((residual[mask].mean() + 1e-3) / (residual[ring].mean() + 1e-3))))
    return float(np.mean(ratios))


def test_difficulty_levels_order_the_trace_strength():
    contrast = {level: _trace_contrast(level) for level in ("easy", "medium", "hard")}
    assert contrast["easy"] > contrast["medium"] > contrast["hard"]


@pytest.mark.parametrize("forgery_type", ["edit_warp", "edit_inpaint", "edit_resynth"])
def test_easy_edits_remove_the_sensor_noise_they_cover(forgery_type):
    # Easy photographs carry sensor noise from capture, before the forgery; an edit that
    # resamples, blurs or inpaints removes it, so the edited area is visibly quieter.
    photos = load_source_photos()
    ratios = []
    for index in range(6):
        rng = np.random.default_rng([5, index])
        image, mask, _meta = make_fake_image(rng, photos, 160, 200, forgery_type=forgery_type,
                                             difficulty="easy")
        residual = np.abs(cv2.Laplacian(image.astype(np.float32).mean(axis=2), cv2.CV_32F))
        inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool) & ~mask
        if inner.sum() > 20 and ring.sum() > 20:
            ratios.append(np.median(residual[inner]) / np.median(residual[ring]))
    assert len(ratios) >= 3
    assert np.median(ratios) < 0.6


def test_sensor_noise_keeps_gray_photographs_gray():
    photos = load_source_photos()
    gray_view = np.repeat(photos["camera"][:64, :80, :1], 3, axis=2)
    captured = _capture(np.random.default_rng(0), gray_view, trace_profile("easy"))
    assert not np.array_equal(captured, gray_view)
    assert np.array_equal(captured[..., 0], captured[..., 1]) and np.array_equal(captured[..., 1], captured[..., 2])
    assert _capture(np.random.default_rng(0), gray_view, trace_profile("hard")) is gray_view


def test_difficulty_levels_are_named_and_unknown_ones_rejected():
    assert set(DIFFICULTIES) == {"easy", "medium", "hard"}
    photos = load_source_photos()
    with pytest.raises(ValueError, match="unknown difficulty 'extreme'"):
        make_real_image(np.random.default_rng(0), photos, 32, 48, difficulty="extreme")
    # Easier levels draw larger regions and a lighter camera pipeline.
    easy, hard = trace_profile("easy"), trace_profile("hard")
    assert easy.large_region[0] > hard.large_region[0]
    assert easy.camera_noise[1] < hard.camera_noise[1]


def test_max_pooled_detection_head_is_the_linear_layer_at_the_best_position():
    from ddl_mask2former.modeling.detection_head import DetectionHead

    torch.manual_seed(0)
    features = {"res4": torch.randn(2, 6, 4, 6), "res5": torch.randn(2, 8, 2, 3)}
    avg = DetectionHead({"res4": 6, "res5": 8}, ("res4", "res5"), pooling="avg")
    head = DetectionHead({"res4": 6, "res5": 8}, ("res4", "res5"), pooling="max")
    head.load_state_dict(avg.state_dict())  # same parameters in both forms
    res4_on_grid = F.avg_pool2d(features["res4"], 2)
    per_position = torch.cat([res4_on_grid, features["res5"]], dim=1).permute(0, 2, 3, 1) @ head.classifier.weight.T
    expected = (per_position[..., 0] + head.classifier.bias).flatten(1).amax(1)
    assert torch.allclose(head(features), expected, atol=1e-6)
    # The mean of the position scores is the paper's average-pooled head.
    assert torch.allclose(head.position_logits(features).mean(dim=(1, 2)), avg(features), atol=1e-6)
    with pytest.raises(ValueError, match="POOLING"):
        DetectionHead({"res5": 8}, pooling="median")
