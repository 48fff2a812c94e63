"""The verdict: features, rules, calibration, the mask policy and the calibration split."""
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

from ddl_mask2former.config import load_config
from ddl_mask2former.data.ddl_dataset import (calibration_key, in_calibration_part,
                                              register_calibration_holdout)
from ddl_mask2former.evaluation.calibration import (
    VerdictRecord, calibrate_model, fit_logistic, fit_rule, probabilities, rule_metrics,
    threshold_at_fpr)
from ddl_mask2former.evaluation.metrics import compute_ddl_metrics_from_arrays
from ddl_mask2former.modeling.meta_arch import DDLMask2Former
from ddl_mask2former.modeling.verdict import (AREA_FLOOR, FEATURES, LOGIT_BOUNDS, RULES, Verdict,
                                              verdict_features)

from model_helpers import build, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def _logit(p):
    return math.log(p) - math.log1p(-p)


def _output(head_prob, mask_prob):
    mask_prob = torch.as_tensor(mask_prob, dtype=torch.float32)
    return {"fake_prob": torch.tensor(head_prob), "mask_prob": mask_prob, "mask": mask_prob > 0.5}


# --- features and rules --------------------------------------------------------------------

def test_features_of_head_and_map():
    mask_prob = torch.full((20, 20), 0.1)
    mask_prob[0, :2] = torch.tensor([0.9, 0.7])  # 2 of 400 pixels: the top 0.5 %
    features = verdict_features(_output(0.25, mask_prob))
    assert features[FEATURES.index("head")] == pytest.approx(_logit(0.25))
    assert features[FEATURES.index("map_max")] == pytest.approx(_logit(0.9), rel=1e-6)
    assert features[FEATURES.index("map_top")] == pytest.approx(_logit(0.8), rel=1e-6)
    assert features[FEATURES.index("map_area")] == pytest.approx(math.log(2 / 400 + AREA_FLOOR))


def test_saturated_maps_do_not_tie():
    # The map's float32 probability at logits 15 and 16 is 1 - 3.6e-7 and 1 - 1.2e-7: a clamp
    # at 1 - 1e-6 gave both log odds 13.8. Only an exact float32 1 takes the bound.
    def map_max(logit):
        return float(verdict_features(_output(0.5, torch.sigmoid(torch.tensor([[logit, -3.0]]))))[1])

    values = [map_max(logit) for logit in (13.0, 15.0, 16.0, 17.0)]
    assert values == sorted(values) and len(set(values)) == 4
    assert values[-1] == LOGIT_BOUNDS[1] and map_max(30.0) == LOGIT_BOUNDS[1]


def test_calibration_separates_maps_beyond_the_old_clamp(caplog):
    # 4 of 32 calibration reals at map logit 15, the fakes at 16, target 10 %: the threshold sits
    # at the reals' 15 and the fakes are called fake (at the old clamp all tied: TPR 0).
    rng = np.random.default_rng(4)
    real_logits = np.concatenate([rng.uniform(-6, 2, 28), [15.0] * 4])
    fake_logits = np.concatenate([rng.uniform(-1, 8, 16), [16.0] * 16])
    maps = [torch.sigmoid(torch.tensor([[float(v), -3.0]])) for v in np.concatenate([real_logits, fake_logits])]
    records = _records([0.5] * 64, maps, [0] * 32 + [1] * 32, [(0, 0, 0)] * 64)
    with caplog.at_level(logging.WARNING):
        fit = fit_rule(records, "map_max", target_fpr=0.1)
    assert fit.fpr <= 0.1 and fit.tpr >= 0.5
    assert "saturated" not in caplog.text
    # Maps saturated at exactly 1 in float32 do tie: the threshold lands there, with a warning.
    saturated = [torch.ones(1, 2) if i in (28, 29, 30, 31) or i >= 48 else m for i, m in enumerate(maps)]
    records = _records([0.5] * 64, saturated, [0] * 32 + [1] * 32, [(0, 0, 0)] * 64)
    with caplog.at_level(logging.WARNING):
        fit_rule(records, "map_max", target_fpr=0.1)
    assert "sits at a saturated feature (4 calibration reals and 16 fakes" in caplog.text


def test_features_of_a_missing_branch_are_nan():
    features = verdict_features({"fake_prob": torch.tensor(0.5)})
    assert features[0] == 0.0 and torch.isnan(features[1:]).all()


@pytest.mark.parametrize("mask_policy", ["gate", "independent"])
def test_the_model_and_the_serving_rules_give_the_same_bits(mask_policy):
    """The PyTorch verdict and ``ddl_mask2former_serve.rules.apply_verdict`` (the exported
    runtime's) on the same raw outputs, with the settings an export writes: equal features,
    fake_prob (float64) and is_fake, maps saturated at float32 1 and 0 included."""
    from ddl_mask2former_serve import rules

    rng = np.random.default_rng(7)
    verdict = Verdict("fusion", mask_policy)
    verdict.set_calibration("fusion", {"head": 0.7, "map_max": 0.4, "map_top": 0.3, "map_area": 0.2},
                            intercept=-0.4, threshold=0.55, target_fpr=0.05)
    settings = json.loads(json.dumps(verdict.describe()))  # as the settings JSON carries it
    called = set()
    for index in range(40):
        logits = rng.normal(0, 1 + index, (37, 53)).astype(np.float32)
        if index % 5 == 0:
            logits[:3, :4] = 40.0  # sigmoid 1 in float32
        if index % 7 == 0:
            logits[:] = -120.0  # sigmoid 0 in float32
        mask_prob = torch.sigmoid(torch.from_numpy(logits))
        head = torch.sigmoid(torch.tensor(float(rng.normal(0, 8)), dtype=torch.float32))
        output = _output(float(head), mask_prob)
        expected = rules.verdict_features(head.numpy(), mask_prob.numpy())
        np.testing.assert_array_equal(verdict_features(output).numpy(), expected)
        served = rules.apply_verdict({"fake_prob": head.numpy(), "mask_prob": mask_prob.numpy()}, settings)
        result = verdict(output)
        assert result["fake_prob"].dtype == torch.float64 and float(result["fake_prob"]) == served["fake_prob"]
        assert bool(result["is_fake"]) == served["is_fake"] == (served["fake_prob"] > settings["threshold"])
        np.testing.assert_array_equal(result["mask_prob"].numpy(), served["mask_prob"])
        called.add(served["is_fake"])
    assert called == {True, False}


@pytest.mark.parametrize("rule, expected", [("head", 0.3), ("map_max", 0.8),
                                            ("fusion", 1 / (1 + math.sqrt(0.7 / 0.3 * 0.2 / 0.8)))])
def test_uncalibrated_rules(rule, expected):
    """head: the head's probability; map_max: the map's maximum; fusion: mean of both log odds."""
    verdict = Verdict(rule)
    output = verdict(_output(0.3, [[0.8, 0.1]]))
    assert float(output["fake_prob"]) == pytest.approx(expected, rel=1e-6)
    assert bool(output["is_fake"]) == (expected > 0.5)


def test_gate_policy_empties_the_map_of_an_image_called_real_only():
    verdict = Verdict("head", "gate")
    real = verdict(_output(0.2, [[0.9, 0.1]]))  # called real, with a confident pixel
    assert not bool(real["is_fake"])
    assert not real["mask"].any() and float(real["mask_prob"].max()) == 0.0
    fake = verdict(_output(0.7, [[0.9, 0.1]]))
    assert bool(fake["is_fake"]) and fake["mask"].tolist() == [[True, False]]
    independent = Verdict("head", "independent")(_output(0.2, [[0.9, 0.1]]))
    assert not bool(independent["is_fake"]) and independent["mask"].tolist() == [[True, False]]


def test_calibration_is_used_and_survives_a_state_dict_round_trip():
    verdict = Verdict("fusion")
    verdict.set_calibration("fusion", {"head": 0.5, "map_max": 2.0, "map_top": -1.0, "map_area": 0.25},
                            intercept=-0.75, threshold=0.6, target_fpr=0.05)
    restored = Verdict("fusion")
    restored.load_state_dict(verdict.state_dict())
    output = _output(0.3, [[0.8, 0.1]])
    x = verdict_features(output)
    expected = 1 / (1 + math.exp(-(0.5 * x[0] + 2.0 * x[1] - 1.0 * x[2] + 0.25 * x[3] - 0.75)))
    result = restored(output)
    assert float(result["fake_prob"]) == pytest.approx(float(expected), rel=1e-6)
    assert bool(result["is_fake"]) == (float(expected) > 0.6)
    assert restored.describe()["threshold"] == 0.6 and restored.describe()["calibrated"]
    # Other rules keep their own (here uncalibrated) parameters.
    restored.rule = "head"
    assert float(restored(output)["fake_prob"]) == pytest.approx(0.3)


def test_is_fake_is_the_exported_fake_prob_above_the_threshold(tmp_path):
    # At a threshold of 0.73000001 a probability of 0.730000005 is real; a float32 export of it
    # (0.7300000190734863) read back above the threshold and captioned it FAKE. Outputs now carry
    # the float64 value that is compared, and prediction.txt writes it exactly.
    from ddl_mask2former.evaluation.export import read_predictions, write_predictions

    verdict = Verdict("head", "gate")
    verdict.set_calibration("head", {"head": 1.0}, 0.0, 0.73000001, 0.05)
    for head_prob in (0.730000005, 0.730000015):
        raw = dict(_output(0.5, [[0.9, 0.1]]), fake_prob=torch.tensor(head_prob, dtype=torch.float64))
        output = verdict(raw)
        write_predictions(str(tmp_path / "prediction.txt"), [("a.png", output["fake_prob"])])
        exported = read_predictions(str(tmp_path / "prediction.txt"))["a.png"]
        assert exported == float(output["fake_prob"]) == pytest.approx(head_prob, abs=1e-15)
        assert bool(output["is_fake"]) == (exported > verdict.threshold) == (head_prob > 0.73000001)
        assert bool(output["mask"].any()) == bool(output["is_fake"])  # gated exactly when called real


def test_calibration_scores_are_the_models_bits():
    # The threshold is one of the calibration reals' scores as the model computes them, so the
    # real that sets it is called real by the model too, and every call agrees with the fit's.
    rng = np.random.default_rng(5)
    labels = [0] * 300 + [1] * 300
    heads = rng.uniform(0.01, 0.99, 600).tolist()
    maps = [[[float(p), float(q)]] for p, q in rng.uniform(0, 1, (600, 2))]
    records = _records(heads, maps, labels, [(0, 0, 0)] * 600)
    for rule in ("fusion", "map_max"):
        fit = fit_rule(records, rule, target_fpr=0.1)
        verdict = Verdict(rule)
        verdict.set_calibration(rule, fit.coefficients, fit.intercept, fit.threshold, 0.1)
        probs = probabilities(records, fit)
        for head, m, expected in zip(heads, maps, probs):
            output = verdict(_output(head, m))
            assert float(output["fake_prob"]) == expected
            assert bool(output["is_fake"]) == (expected > fit.threshold)
        assert fit.threshold in set(probs[:300].tolist())


def test_rules_that_need_a_missing_branch_are_refused():
    with pytest.raises(ValueError, match="lacks the branch"):
        Verdict("map_max", has_localization=False)
    with pytest.raises(ValueError, match="lacks the branch"):
        Verdict("fusion", has_detection=False)
    with pytest.raises(ValueError, match="RULE must be one of"):
        Verdict("vote")
    assert not Verdict("head", has_detection=False).enabled


# --- the model's outputs agree --------------------------------------------------------------

@pytest.mark.parametrize("rule", ["head", "map_max", "fusion"])
def test_model_outputs_agree_with_the_verdict(rule):
    cfg = tiny_cfg()
    cfg.MODEL.DDL.VERDICT.RULE = rule
    cfg.MODEL.DDL.VERDICT.MASK_POLICY = "gate"
    model = build(cfg).eval()
    model.verdict.set_calibration(rule, {f: 1.0 for f in RULES[rule]}, 0.0, threshold=0.5, target_fpr=0.05)
    generator = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=generator),
               "height": 64, "width": 64} for _ in range(4)]
    with torch.no_grad():
        outputs = model(inputs)
    for output in outputs:
        assert bool(output["is_fake"]) == (float(output["fake_prob"]) > model.verdict.threshold)
        if not bool(output["is_fake"]):
            assert not output["mask"].any()


def test_two_class_map_keeps_forged_beats_authentic_for_tiny_scores():
    """forged 4e-7 vs authentic 1e-7 is forged 0.8 (a 1e-6 floor on the sum made it 0.4)."""
    query_logits = torch.tensor([[_logit(2e-7), _logit(8e-7)]])  # one query: (authentic, forged)
    mask_logits = torch.zeros(1, 2, 2)  # sigmoid 0.5
    prob = DDLMask2Former.combine_query_masks(query_logits, mask_logits, ("authentic", "forged"))
    assert torch.allclose(prob, torch.full((2, 2), 0.8), atol=1e-4)
    single = DDLMask2Former.combine_query_masks(query_logits[:, 1:], mask_logits, ("forged",))
    assert torch.allclose(single, torch.full((2, 2), 4e-7), rtol=1e-4)


# --- fitting --------------------------------------------------------------------------------

def test_fit_logistic_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2)) * [1.0, 3.0] + [0.5, -1.0]
    y = rng.random(20000) < 1 / (1 + np.exp(-(1.5 * x[:, 0] - 0.5 * x[:, 1] + 0.25)))
    weights, intercept = fit_logistic(x, y.astype(float))
    assert weights == pytest.approx([1.5, -0.5], abs=0.06)
    assert intercept == pytest.approx(0.25, abs=0.06)


def test_fit_logistic_stays_finite_on_separable_data():
    weights, intercept = fit_logistic(np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0, 0, 1, 1.0]))
    assert np.isfinite(weights).all() and math.isfinite(intercept) and weights[0] > 0
    with pytest.raises(ValueError, match="both real"):
        fit_logistic(np.zeros((3, 1)), np.ones(3))


@pytest.mark.parametrize("fpr, expected", [(0.0, 1.0), (0.1, 0.9), (0.15, 0.9), (0.2, 0.8), (0.5, 0.5)])
def test_threshold_at_fpr(fpr, expected):
    reals = [0.1 * i for i in range(1, 11)]
    threshold = threshold_at_fpr(reals, fpr)
    assert threshold == pytest.approx(expected)
    assert np.mean(np.asarray(reals) > threshold) <= fpr


def test_threshold_at_fpr_just_below_one_is_the_lowest_real():
    reals = [0.1 * i for i in range(1, 11)]
    for fpr in (0.999999999999, 1 - 1e-10, 0.95):
        assert threshold_at_fpr(reals, fpr) == pytest.approx(0.1)


@pytest.mark.parametrize("value", ["5.0", "1.0", "-0.1"])
def test_target_fpr_out_of_range_is_refused_when_the_config_loads(value):
    with pytest.raises(ValueError, match=r"MODEL\.DDL\.VERDICT\.TARGET_FPR must be .*\[0, 1\)"):
        load_config(TINY_CONFIG, ["MODEL.DDL.VERDICT.TARGET_FPR", value])
    assert load_config(TINY_CONFIG, ["MODEL.DDL.VERDICT.TARGET_FPR", "0.0"]).MODEL.DDL.VERDICT.TARGET_FPR == 0.0


def _records(head, maps, labels, counts):
    records = []
    for index, (h, m, label, (tp, fp, fn)) in enumerate(zip(head, maps, labels, counts)):
        features = tuple(verdict_features(_output(h, m)).tolist())
        records.append(VerdictRecord(f"{index}.png", label, features, tp, fp, fn, 100))
    return records


def test_fit_rule_keeps_the_calibration_false_positive_rate():
    rng = np.random.default_rng(1)
    labels = [0] * 40 + [1] * 40
    maps = [[[float(p)]] for p in np.concatenate([rng.uniform(0.0, 0.7, 40), rng.uniform(0.4, 1.0, 40)])]
    records = _records([0.5] * 80, maps, labels, [(0, 0, 0)] * 80)
    fit = fit_rule(records, "map_max", target_fpr=0.05)
    probs = probabilities(records, fit)
    assert fit.coefficients["map_max"] > 0
    assert fit.fpr <= 0.05 and fit.fpr == pytest.approx(np.mean(probs[:40] > fit.threshold))
    assert fit.tpr == pytest.approx(np.mean(probs[40:] > fit.threshold))


def test_rule_metrics_gate_hand_computed():
    """Two fakes (one called fake, one called real) and two reals (one called fake with 5 %
    marked, one called real with 3 % marked): the gate drops the called-real image's pixels."""
    labels = [1, 1, 0, 0]
    head = [0.9, 0.2, 0.8, 0.1]
    counts = [(30, 10, 0), (20, 0, 20), (0, 5, 0), (0, 3, 0)]
    records = _records(head, [[[0.5]]] * 4, labels, counts)
    fit = fit_rule(records, "head", target_fpr=0.5)._replace(
        coefficients={"head": 1.0}, intercept=0.0, threshold=0.5)
    gated = rule_metrics(records, fit, "gate")
    assert gated["f1"] == pytest.approx((60 / 70 + 0.0) / 2)
    assert gated["iou"] == pytest.approx((30 / 40 + 0.0) / 2)
    assert gated["real_false_alarm"] == pytest.approx(0.5)  # the called-fake real: 5 % > 1 %
    assert gated["real_called_fake"] == 0.5 and gated["fake_called_real"] == 0.5
    assert gated["good_fake_called_real"] == 1  # the second fake: raw IoU 0.5, called real
    independent = rule_metrics(records, fit, "independent")
    assert independent["iou"] == pytest.approx((30 / 40 + 20 / 40) / 2)
    assert independent["real_false_alarm"] == 1.0


def test_calibrate_model_stores_every_rule():
    cfg = tiny_cfg()
    model = build(cfg)
    rng = np.random.default_rng(2)
    labels = [0] * 10 + [1] * 10
    maps = [[[float(p)]] for p in rng.uniform(0, 1, 20)]
    records = _records(rng.uniform(0.05, 0.95, 20).tolist(), maps, labels, [(0, 0, 0)] * 20)
    fits = calibrate_model(model, records, target_fpr=0.1)
    assert [fit.rule for fit in fits] == list(RULES)
    assert model.verdict.calibrated
    index = list(RULES).index(model.verdict.rule)
    assert float(model.verdict.thresholds[index]) == pytest.approx(fits[index].threshold)
    with pytest.raises(ValueError, match="real and fake"):
        calibrate_model(model, records[:10], target_fpr=0.1)
    # A bad rate is an error, not a silently skipped rule (that shipped an uncalibrated model).
    fresh = build(cfg)
    with pytest.raises(ValueError, match="TARGET_FPR"):
        calibrate_model(fresh, records, target_fpr=5)
    assert not fresh.verdict.calibrated


def test_real_false_alarm_metric():
    metrics = compute_ddl_metrics_from_arrays(
        labels=[0, 0, 0, 1], fake_prob=[0.1, 0.2, 0.3, 0.9], tp=[0, 0, 0, 5], fp=[2, 1, 0, 0],
        fn=[0, 0, 0, 0], num_pixels=[100, 100, 100, 100])
    assert metrics["real_false_alarm"] == pytest.approx(1 / 3)  # only 2 % > 1 %; 1 % is not above


# --- the calibration split ------------------------------------------------------------------

def test_calibration_holdout_is_a_fixed_disjoint_tenth():
    dicts = [{"image_id": f"{folder}/{i:04d}.png", "label": int(folder == "fake")}
             for folder in ("real", "fake") for i in range(1000)]
    DatasetCatalog.register("test_holdout_base", lambda: dicts)
    try:
        fit_name, calib_name = register_calibration_holdout("test_holdout_base")
        fit, calib = DatasetCatalog.get(fit_name), DatasetCatalog.get(calib_name)
        assert len(fit) + len(calib) == 2000
        assert {d["image_id"] for d in fit}.isdisjoint(d["image_id"] for d in calib)
        assert 150 <= len(calib) <= 250
        assert all(in_calibration_part(calibration_key(d)) for d in calib)
    finally:
        for name in ("test_holdout_base", "test_holdout_base_fit", "test_holdout_base_calib"):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)


def test_calibration_holdout_keeps_a_fake_and_its_source_on_one_side():
    # A release that pairs each fake with the real image it came from under the same stem: split
    # by file name, 3,534 of 20,000 pairs landed on opposite sides.
    dicts = [{"image_id": f"{folder}/{i:05d}.png", "label": int(folder == "fake")}
             for folder in ("real", "fake") for i in range(20000)]
    DatasetCatalog.register("test_pairs_base", lambda: dicts)
    try:
        fit_name, calib_name = register_calibration_holdout("test_pairs_base")
        fit_stems = {calibration_key(d) for d in DatasetCatalog.get(fit_name)}
        calib_stems = {calibration_key(d) for d in DatasetCatalog.get(calib_name)}
        assert fit_stems.isdisjoint(calib_stems) and len(fit_stems | calib_stems) == 20000
        assert 1800 <= len(calib_stems) <= 2200
    finally:
        for name in ("test_pairs_base", "test_pairs_base_fit", "test_pairs_base_calib"):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
    # A source id, where the data has one, decides instead of the stem.
    assert calibration_key({"image_id": "fake/a_swap.png", "source_id": "src42"}) == "src42"
    assert calibration_key({"image_id": "real/0007.jpg"}) == "0007"
