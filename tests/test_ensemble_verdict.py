"""The ensemble fuses its members' evidence before their verdicts and gets a verdict of its own
(evaluation/fusion.py, tools/ensemble.py), on hand-made member exports."""
import json
import os

import numpy as np
import pytest

from data_helpers import make_labeled_split
from ddl_mask2former.evaluation.export import (
    decode_prob_u8, encode_prob_u8, read_gray_png, read_predictions, write_png, write_predictions)
from ddl_mask2former.evaluation.fusion import calibrate_ensemble, fuse_exports
from tool_helpers import load_tool


def _write_member(export_dir, maps, heads, threshold, gate=True):
    """A member's export as the evaluator writes it: its verdict (map_max, uncalibrated) called
    an image fake when its map's max is above ``threshold``; the gate emptied the others' maps."""
    for folder in ("prob", "mask", "ungated_prob"):
        os.makedirs(os.path.join(export_dir, folder), exist_ok=True)
    scores = []
    for name, prob in maps.items():
        codes = encode_prob_u8(prob)
        called_fake = float(decode_prob_u8(codes).max()) > threshold
        shown = codes if (called_fake or not gate) else np.zeros_like(codes)
        write_png(os.path.join(export_dir, "prob", name), shown)
        write_png(os.path.join(export_dir, "mask", name), np.where(shown >= 128, 255, 0).astype(np.uint8))
        if gate and not called_fake:
            write_png(os.path.join(export_dir, "ungated_prob", name), codes)
        scores.append((name, float(decode_prob_u8(codes).max())))
    write_predictions(os.path.join(export_dir, "prediction.txt"), scores)
    write_predictions(os.path.join(export_dir, "head_prediction.txt"), list(heads.items()))
    with open(os.path.join(export_dir, "verdict.json"), "w") as f:
        json.dump({"rule": "map_max", "mask_policy": "gate", "target_fpr": 0.25, "threshold": threshold,
                   "calibrated": True}, f)


def _forged_map(value, size=(8, 8)):
    prob = np.full(size, 0.02, np.float32)
    prob[2:6, 2:6] = value  # 16 forged pixels
    return prob


def test_a_member_that_called_an_image_real_does_not_dilute_the_other(tmp_path):
    # Both members see the 16 forged pixels at 0.85; member B's verdict called the image real and
    # its gate emptied the map. Fusing the gated maps gave max 0.43 and 0 of 16 pixels.
    a, b, out = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "fused")
    _write_member(a, {"x.png": _forged_map(0.85)}, {"x.png": 0.8}, threshold=0.5)
    _write_member(b, {"x.png": _forged_map(0.85)}, {"x.png": 0.7}, threshold=0.9)
    assert read_gray_png(os.path.join(b, "prob", "x.png")).max() == 0
    fuse_exports([a, b], out, det_weights=[1, 1], loc_weights=[1, 1])
    fused = decode_prob_u8(read_gray_png(os.path.join(out, "prob", "x.png")))
    assert fused.max() == pytest.approx(0.85, abs=1 / 256)
    assert (read_gray_png(os.path.join(out, "mask", "x.png")) == 255).sum() == 16
    # The scores fused are the heads' (before the verdicts): (0.8 + 0.7) / 2.
    assert read_predictions(os.path.join(out, "prediction.txt"))["x.png"] == pytest.approx(0.75)


@pytest.fixture
def calibration_and_eval(tmp_path):
    """Members' exports of a labeled calibration split and of an eval split (same names)."""
    split = str(tmp_path / "calib_split")
    expected = make_labeled_split(split, num_real=8, num_fake=8)
    rng = np.random.default_rng(0)
    exports = {}
    for member, threshold in (("a", 0.6), ("b", 0.8)):
        maps, heads = {}, {}
        for key, (label, size) in expected.items():
            name = os.path.basename(key)
            level = rng.uniform(0.55, 0.95) if label else rng.uniform(0.05, 0.6)
            maps[name] = _forged_map(level, size)
            heads[name] = float(rng.uniform(0.4, 0.9) if label else rng.uniform(0.1, 0.6))
        exports[member] = str(tmp_path / f"{member}_calib")
        _write_member(exports[member], maps, heads, threshold)
    return split, exports


def test_ensemble_gets_its_own_calibrated_verdict_and_gate(calibration_and_eval, tmp_path):
    split, exports = calibration_and_eval
    members = [exports["a"], exports["b"]]
    verdict, fits = calibrate_ensemble(members, split, target_fpr=0.25, det_weights=[1, 1],
                                       loc_weights=[1, 1], rule="map_max")
    assert verdict.calibrated and {fit.rule for fit in fits} == {"head", "map_max", "map_top", "fusion"}
    map_max_fit = next(fit for fit in fits if fit.rule == "map_max")
    assert map_max_fit.fpr <= 0.25 and map_max_fit.tpr > 0.5
    out = str(tmp_path / "ensemble")
    fuse_exports(members, out, det_weights=[1, 1], loc_weights=[1, 1], verdict=verdict)
    described = json.load(open(os.path.join(out, "verdict.json")))
    assert described["calibrated"] and described["rule"] == "map_max"
    assert described["threshold"] == verdict.threshold
    scores = read_predictions(os.path.join(out, "prediction.txt"))
    heads = read_predictions(os.path.join(out, "head_prediction.txt"))
    for name, fake_prob in scores.items():
        prob = read_gray_png(os.path.join(out, "prob", name))
        ungated = os.path.join(out, "ungated_prob", name)
        if fake_prob > described["threshold"]:
            assert prob.max() > 0 and not os.path.exists(ungated)
        else:  # called real: gated after fusion, the fused map kept for a later ensemble
            assert prob.max() == 0 and read_gray_png(ungated).max() > 0
        assert 0.0 < heads[name] < 1.0
    # tools/ensemble.py does the same from the command line, the verdict's settings taken from
    # the members' verdict.json (rule, gate, target FPR 0.25).
    cli_out = str(tmp_path / "ensemble_cli")
    ensemble = load_tool("ensemble")
    assert ensemble.main(["--inputs", *members, "--det-weights", "1", "1", "--loc-weights", "1", "1",
                          "--calibration-inputs", *members, "--calibration-split", split,
                          "--out", cli_out, "--no-progress"]) == 0
    assert read_predictions(os.path.join(cli_out, "prediction.txt")) == scores
    assert json.load(open(os.path.join(cli_out, "verdict.json")))["target_fpr"] == 0.25


def test_ensemble_of_verdict_members_without_calibration_says_so(calibration_and_eval, tmp_path, caplog):
    _, exports = calibration_and_eval
    out = str(tmp_path / "uncalibrated")
    ensemble = load_tool("ensemble")
    assert ensemble.main(["--inputs", exports["a"], exports["b"], "--loc-weights", "1", "1",
                          "--out", out, "--no-progress"]) == 0
    assert "verdict is not calibrated" in caplog.text
    assert json.load(open(os.path.join(out, "verdict.json")))["calibrated"] is False
