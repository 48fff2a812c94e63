"""Metric functions, the 8-bit probability codec and prediction.txt parsing."""
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ddl_mask2former.evaluation.export import (
    PROB_CODE_THRESHOLD,
    decode_prob_u8,
    encode_prob_u8,
    read_predictions,
    write_predictions,
)
from ddl_mask2former.evaluation.metrics import (
    LABEL_UNKNOWN,
    NO_GROUP,
    ImageRecord,
    compute_ddl_metrics,
    compute_group_metrics,
    f1_from_counts,
    format_metrics_table,
    group_images,
    iou_from_counts,
    mask_counts,
    roc_auc,
)

NAN = float("nan")


def test_auc_hand_computed():
    # perfectly separated
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    # pairs (pos, neg): (0.8,0.1)>, (0.8,0.5)>, (0.4,0.1)>, (0.4,0.5)<  -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.8, 0.4]) == 0.75
    # one tie counts one half: (0.5,0.5)=, (0.9,0.5)>  -> 1.5/2
    assert roc_auc([0, 1, 1], [0.5, 0.5, 0.9]) == 0.75
    # all equal scores: every pair tied
    assert roc_auc([0, 1, 0, 1], [0.3] * 4) == 0.5


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(30):
        size = int(rng.integers(2, 400))
        labels = rng.integers(0, 2, size)
        labels[:2] = [0, 1]
        # few distinct values -> many ties across and within classes
        scores = rng.integers(0, int(rng.integers(2, 12)), size) / 10.0
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_one_class_is_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="only one class"):
        assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.warns(RuntimeWarning, match="only one class"):
        assert math.isnan(roc_auc([0], [0.1]))


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.1, NAN])
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        roc_auc([0, 1, 1], [0.1, 0.2])


def test_counts_f1_iou_hand_computed():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    gt = np.array([[1, 0, 0], [0, 1, 1]], bool)
    assert mask_counts(pred, gt) == (2, 1, 1)
    assert f1_from_counts(2, 1, 1) == 4 / 6
    assert iou_from_counts(2, 1, 1) == 2 / 4
    # empty prediction on a non-empty mask scores 0
    assert f1_from_counts(0, 0, 5) == 0.0 and iou_from_counts(0, 0, 5) == 0.0
    # prediction on an empty mask scores 0; nothing predicted and nothing to find scores 1
    assert f1_from_counts(0, 3, 0) == 0.0 and iou_from_counts(0, 3, 0) == 0.0
    assert f1_from_counts(0, 0, 0) == 1.0 and iou_from_counts(0, 0, 0) == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        mask_counts(pred, gt[:, :2])


def _records():
    # fake a: small mask hit exactly; fake b: large mask, half found; real c: 2 of 10 px forged
    return [
        ImageRecord("a.png", 1, 0.9, tp=1, fp=0, fn=0, num_pixels=10),
        ImageRecord("b.png", 1, 0.4, tp=50, fp=0, fn=50, num_pixels=200),
        ImageRecord("c.png", 0, 0.6, tp=0, fp=2, fn=0, num_pixels=10),
        ImageRecord("d.png", 0, 0.1, tp=0, fp=0, fn=0, num_pixels=10),
    ]


def test_dataset_metrics_hand_computed_and_per_image_differs_from_pixel():
    metrics = compute_ddl_metrics(_records())
    # pairs: (0.9 vs 0.6, 0.1) both >, (0.4 vs 0.6) <, (0.4 vs 0.1) >  -> 3/4
    assert metrics["auc"] == 0.75
    # per image: F1 = (1 + 100/150) / 2, IoU = (1 + 0.5) / 2
    assert metrics["f1"] == pytest.approx((1 + 100 / 150) / 2)
    assert metrics["iou"] == pytest.approx(0.75)
    # summed: TP 51, FP 0, FN 50 -> the large image dominates
    assert metrics["f1_pixel"] == pytest.approx(102 / 152)
    assert metrics["iou_pixel"] == pytest.approx(51 / 101)
    assert metrics["f1"] != pytest.approx(metrics["f1_pixel"], abs=0.05)
    assert metrics["real_forged_frac"] == pytest.approx(2 / 20)
    assert metrics["score"] == pytest.approx((0.75 + metrics["f1"] + metrics["iou"]) / 3)
    assert (metrics["num_real"], metrics["num_fake"], metrics["num_unlabeled"]) == (2, 2, 0)


def test_metrics_of_one_task_only_and_unlabeled_images():
    det_only = [r._replace(tp=-1, fp=-1, fn=-1) for r in _records()]
    metrics = compute_ddl_metrics(det_only)
    assert metrics["auc"] == 0.75 and "f1" not in metrics and "score" not in metrics
    loc_only = [r._replace(fake_prob=NAN) for r in _records()]
    metrics = compute_ddl_metrics(loc_only + [ImageRecord("u.png", -1, NAN, 0, 7, 0, 10)])
    assert "auc" not in metrics and "score" not in metrics
    assert metrics["iou"] == pytest.approx(0.75) and metrics["num_unlabeled"] == 1
    # the unlabeled image's 7 predicted pixels are not counted as false positives
    assert metrics["real_forged_frac"] == pytest.approx(2 / 20)


def test_metrics_reject_mixed_configurations():
    records = _records()
    records[1] = records[1]._replace(fake_prob=NAN)
    with pytest.raises(ValueError, match="b.png"):
        compute_ddl_metrics(records)


def test_metrics_with_one_class_give_nan_auc_and_score():
    with pytest.warns(RuntimeWarning):
        metrics = compute_ddl_metrics(_records()[:2])
    assert math.isnan(metrics["auc"]) and math.isnan(metrics["score"])
    assert math.isnan(metrics["real_forged_frac"])
    assert "AUC" in format_metrics_table(metrics)


def test_group_metrics_key_real_images_lack_scores_each_group_against_all_reals():
    # a forgery type: no real image has one, so reals are grouped nowhere and are every group's
    records = [r._replace(group="swap" if r.name == "a.png" else None) for r in _records()]
    records.append(ImageRecord("e.png", 1, 0.05, 0, 0, 4, 10, "edit"))
    records.append(ImageRecord("u.png", LABEL_UNKNOWN, 0.5, 0, 0, 0, 10, "swap"))
    groups = compute_group_metrics(records)
    assert list(groups) == ["edit", "swap", NO_GROUP]  # sorted, images without a type last
    # swap: its one fake (0.9) against both reals (0.6, 0.1) -> 1.0; u.png (unlabeled) is out
    assert groups["swap"]["auc"] == 1.0 and groups["swap"]["auc_vs_all_reals"] == 1.0
    assert (groups["swap"]["num_fake"], groups["swap"]["num_real"]) == (1, 2)
    assert groups["swap"]["f1"] == 1.0 and "real_false_alarm" not in groups["swap"]
    # edit: 0.05 below both reals; (none): b (0.4) beats one real of two
    assert groups["edit"]["auc"] == 0.0 and groups["edit"]["f1"] == 0.0
    assert groups[NO_GROUP]["auc"] == 0.5 and groups[NO_GROUP]["auc_vs_all_reals"] == 1.0
    assert groups["swap"]["score"] == pytest.approx((1.0 + 1.0 + 1.0) / 3)
    table = format_metrics_table(compute_ddl_metrics(records), groups)
    assert "swap" in table and "100.00*" in table and "its fakes against all reals" in table


def test_group_metrics_key_of_the_whole_image_groups_reals_too():
    # some real images have a value: each group holds its own reals and fakes
    values = {"a.png": ["x", "z"], "c.png": "x", "b.png": "y"}
    records = [r._replace(group=values.get(r.name)) for r in _records()]
    groups = compute_group_metrics(records)
    assert list(groups) == ["x", "y", "z", NO_GROUP]
    # x: a (0.9) against its own real c (0.6), whose 2 of 10 pixels are marked
    assert groups["x"]["auc"] == 1.0 and groups["x"]["auc_vs_all_reals"] == 0.0
    assert (groups["x"]["num_fake"], groups["x"]["num_real"]) == (1, 1)
    assert groups["x"]["real_false_alarm"] == 1.0
    # y and z have no real of their own: against all reals (c 0.6, d 0.1); a counts in x and z
    assert groups["y"]["auc"] == 0.5 and groups["y"]["auc_vs_all_reals"] == 1.0
    assert groups["z"]["auc"] == 1.0 and groups["z"]["num_real"] == 2
    # (none): d alone, one class: no AUC, no F1, nothing dropped
    assert (groups[NO_GROUP]["num_real"], groups[NO_GROUP]["num_fake"]) == (1, 0)
    assert math.isnan(groups[NO_GROUP]["auc"]) and math.isnan(groups[NO_GROUP]["f1"])
    assert groups[NO_GROUP]["real_false_alarm"] == 0.0


def test_group_images_rule():
    labels = [0, 1, 1, 0, LABEL_UNKNOWN]
    forgery = group_images([None, "p", ["p", "q"], None, "p"], labels)
    assert {group: (g.indices.tolist(), g.vs_all_reals) for group, g in forgery.items()} == {
        "p": ([0, 1, 2, 3], True), "q": ([0, 2, 3], True)}
    image = group_images(["s", "t", None, None, "s"], labels)
    assert {group: (g.indices.tolist(), g.vs_all_reals) for group, g in image.items()} == {
        "s": ([0], False), "t": ([0, 1, 3], True), NO_GROUP: ([2, 3], False)}
    with pytest.raises(ValueError, match="2 group values for 5 images"):
        group_images(["s", "t"], labels)


def test_prob_codec_threshold_is_exact():
    half = np.float32(0.5)
    probs = np.array([0, 1e-9, 1 / 256, 0.25, half, np.nextafter(half, np.float32(1)),
                      np.nextafter(half, np.float32(0)), 0.999, 1.0], np.float32)
    codes = encode_prob_u8(probs)
    assert codes.tolist() == [0, 0, 0, 63, 127, 128, 127, 255, 255]
    rng = np.random.default_rng(0)
    # random probabilities plus every interval edge k/256 and its float32 neighbours
    edges = np.arange(257, dtype=np.float32) / 256
    probs = np.concatenate([rng.random(100000, dtype=np.float32), edges,
                            np.nextafter(edges, np.float32(2)), np.nextafter(edges, np.float32(-1))])
    probs = np.clip(probs, 0, 1)
    codes = encode_prob_u8(probs)
    np.testing.assert_array_equal(codes >= PROB_CODE_THRESHOLD, probs > 0.5)
    # decoding lands in the code's own interval, so re-encoding is the identity
    decoded = decode_prob_u8(codes)
    np.testing.assert_array_equal(encode_prob_u8(decoded), codes)
    np.testing.assert_array_equal(decoded > 0.5, probs > 0.5)
    assert np.abs(decoded - probs).max() <= 1 / 256


def test_prob_codec_torch_equals_numpy():
    import torch

    rng = np.random.default_rng(1)
    edges = np.arange(257, dtype=np.float32) / 256
    probs = np.concatenate([rng.random(10000, dtype=np.float32), edges,
                            np.nextafter(edges, np.float32(1))]).clip(0, 1).reshape(-1, 7)
    np.testing.assert_array_equal(encode_prob_u8(torch.from_numpy(probs)), encode_prob_u8(probs))
    with pytest.raises(ValueError, match="NaN"):
        encode_prob_u8(torch.tensor([0.2, float("nan")]))


def test_prob_codec_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        encode_prob_u8(np.array([0.1, np.nan], np.float32))


def test_predictions_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    scores = {f"img_{i}.png": float(np.float32(rng.random())) for i in range(50)}
    scores["tiny.png"] = 1e-300
    path = str(tmp_path / "prediction.txt")
    write_predictions(path, scores.items())
    assert read_predictions(path) == scores
    lines = open(path).read().splitlines()
    assert lines == sorted(lines) and lines[0].count(",") == 1


@pytest.mark.parametrize("content, message", [
    ("a.png,0.5\nb.png\n", "line 2.*expected"),
    ("a.png,0.5\nb.png,high\n", "line 2: score of b.png is not a number"),
    ("a.png,nan\n", "score of a.png is nan"),
    ("a.png,0.5\na.png,0.6\n", "line 2: a.png has a second score"),
    (",0.5\n", "line 1.*expected"),
])
def test_malformed_predictions_name_the_line_and_image(tmp_path, content, message):
    path = tmp_path / "prediction.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_predictions(str(path))
