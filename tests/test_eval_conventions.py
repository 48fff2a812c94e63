"""Other papers' metric conventions (evaluation/conventions.py) on hand-computed cases, and
``tools/evaluate_predictions.py --conventions`` against a brute-force recomputation."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from ddl_mask2former.evaluation import DDLEvaluator
from ddl_mask2former.evaluation.conventions import (
    best_threshold_f1, code_histograms, compute_conventions, inverted_max_f1, operating_point,
    pooled_two_class)

from eval_helpers import make_outputs, write_split
from tool_helpers import load_tool

evaluate_predictions = load_tool("evaluate_predictions")


def test_best_threshold_f1_by_hand():
    # 2x3 image, forged pixels in the left column; codes chosen so that ">= 200" is perfect
    codes = np.array([[250, 10, 100], [200, 150, 30]], np.uint8)
    forged = np.array([[1, 0, 0], [1, 0, 0]], bool)
    f1, code = best_threshold_f1(*code_histograms(codes, forged))
    assert (f1, code) == (1.0, 200)
    # swap one background pixel above the forged ones: best is ">= 200" with FP 1 (F1 0.8)
    # against ">= 251" (nothing, F1 0) and ">= 250" (TP 1, FN 1: F1 2/3)
    codes[0, 1] = 255
    f1, code = best_threshold_f1(*code_histograms(codes, forged))
    assert (f1, code) == (pytest.approx(0.8), 200)


def test_best_threshold_f1_edge_cases():
    empty = np.zeros((2, 2), bool)
    # nothing forged: the best is to mark nothing, which scores 1 (metrics.py's convention)
    assert best_threshold_f1(*code_histograms(np.full((2, 2), 255, np.uint8), empty)) == (1.0, 256)
    # everything forged and every code 0: only "mark everything" (k = 0) finds it
    assert best_threshold_f1(*code_histograms(np.zeros((2, 2), np.uint8), ~empty)) == (1.0, 0)
    with pytest.raises(TypeError, match="uint8"):
        code_histograms(np.zeros((2, 2), np.float32), empty)
    with pytest.raises(ValueError, match="differ in size"):
        code_histograms(np.zeros((2, 3), np.uint8), empty)


def test_inverted_max_f1_by_hand():
    # a mask exactly inverted: F1 0 as given, 1 inverted (TruFor counts it as perfect)
    assert inverted_max_f1(tp=0, fp=6, fn=4, tn=0) == 1.0
    # TP 2, FP 1, FN 2, TN 5: F1 = 4/7; inverted TP' = 2, FP' = 5, FN' = 2: 4/11
    assert inverted_max_f1(2, 1, 2, 5) == pytest.approx(4 / 7)


def test_pooled_two_class_by_hand():
    # TP 3, FP 1, FN 2, TN 14: forged IoU 3/6, background IoU 14/17, F1 6/9
    pooled = pooled_two_class(3, 1, 2, 14)
    assert pooled["pooled_f1"] == pytest.approx(6 / 9)
    assert pooled["iou_forged"] == pytest.approx(0.5)
    assert pooled["iou_background"] == pytest.approx(14 / 17)
    assert pooled["miou_two_class"] == pytest.approx((0.5 + 14 / 17) / 2)


def test_operating_point_by_hand():
    labels = [0] * 10 + [1] * 4
    reals = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    fakes = [0.97, 0.92, 0.85, 0.3]
    # 5 % of 10 reals: none may score above -> threshold 0.95, one fake above it
    assert operating_point(labels, reals + fakes, 0.05) == {"threshold": 0.95, "tpr": 0.25, "fpr": 0.0}
    # 10 %: one real may -> threshold 0.9, fakes 0.97 and 0.92 above
    assert operating_point(labels, reals + fakes, 0.10) == {"threshold": 0.9, "tpr": 0.5, "fpr": 0.1}
    with pytest.raises(ValueError, match="real and fake"):
        operating_point([1, 1], [0.2, 0.3], 0.05)


def test_compute_conventions_skips_absent_tasks():
    labels = np.array([0, 1])
    no_scores = compute_conventions(labels, [np.nan, np.nan], [0, 2], [1, 0], [0, 1], [4, 4])
    assert "operating_points" not in no_scores and no_scores["f1_best_threshold"] is None
    no_masks = compute_conventions(labels, [0.2, 0.7], [-1, -1], [-1, -1], [-1, -1], [4, 4])
    assert set(no_masks) == {"operating_points"}


def _brute_force(split, export):
    """Every convention recomputed from the PNGs, one image at a time, with plain numpy."""
    tp = fp = fn = tn = 0
    best, inverted = [], []
    for name in sorted(os.listdir(os.path.join(split, "fake"))):
        gt = cv2.imread(os.path.join(split, "masks", name), cv2.IMREAD_GRAYSCALE) > 127
        prob = cv2.imread(os.path.join(export, "prob", name), cv2.IMREAD_GRAYSCALE)
        pred = prob >= 128
        counts = [int(np.sum(pred & gt)), int(np.sum(pred & ~gt)), int(np.sum(~pred & gt)),
                  int(np.sum(~pred & ~gt))]
        tp, fp, fn, tn = tp + counts[0], fp + counts[1], fn + counts[2], tn + counts[3]

        def f1(a, b, c):
            return 1.0 if 2 * a + b + c == 0 else 2 * a / (2 * a + b + c)

        inverted.append(max(f1(counts[0], counts[1], counts[2]), f1(counts[2], counts[3], counts[0])))
        scores = []
        for k in range(257):
            mask = prob.astype(int) >= k
            scores.append(f1(np.sum(mask & gt), np.sum(mask & ~gt), np.sum(~mask & gt)))
        best.append(max(scores))
    return {"pooled_f1": 2 * tp / (2 * tp + fp + fn),
            "miou_two_class": (tp / (tp + fp + fn) + tn / (tn + fn + fp)) / 2,
            "f1_inverted_max": np.mean(inverted), "f1_best_threshold": np.mean(best)}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("conventions")
    split = str(root / "split")
    dicts = write_split(split, num_real=5, num_fake=7)
    evaluator = DDLEvaluator("conventions_test", export_dir=str(root / "export"))
    evaluator.reset()
    evaluator.process(dicts, make_outputs(dicts, seed=3))
    evaluator.evaluate()
    return split, str(root / "export")


def test_evaluate_predictions_conventions_match_brute_force(export, tmp_path, capsys):
    split, export_dir = export
    json_path = str(tmp_path / "m.json")
    assert evaluate_predictions.main(["--pred", export_dir, "--gt", split, "--json", json_path,
                                      "--no-progress", "--conventions"]) == 0
    out = capsys.readouterr().out
    assert "two-class mIoU" in out and "TPR" in out
    payload = json.load(open(json_path))
    conventions = payload["conventions"]
    for key, value in _brute_force(split, export_dir).items():
        assert conventions[key] == pytest.approx(value, abs=1e-12), key
    # the pooled F1 is the headline's f1_pixel under another name
    assert conventions["pooled_f1"] == pytest.approx(payload["f1_pixel"], abs=1e-12)
    scores = {}
    for line in open(os.path.join(export_dir, "prediction.txt")):
        name, score = line.strip().split(",")
        scores[name] = float(score)
    labels = [int(name.startswith("fake")) for name in sorted(scores)]
    for name, point in conventions["operating_points"].items():
        assert point == operating_point(labels, [scores[n] for n in sorted(scores)],
                                        float(name.rstrip("%")) / 100)
    # without the flag the JSON keeps its keys
    assert evaluate_predictions.main(["--pred", export_dir, "--gt", split, "--json", json_path,
                                      "--no-progress"]) == 0
    assert "conventions" not in json.load(open(json_path))


def test_conventions_without_prob_maps_say_so(export, tmp_path, capsys):
    split, export_dir = export
    no_prob = str(tmp_path / "no_prob")
    shutil.copytree(export_dir, no_prob)
    shutil.rmtree(os.path.join(no_prob, "prob"))
    json_path = str(tmp_path / "m.json")
    assert evaluate_predictions.main(["--pred", no_prob, "--gt", split, "--json", json_path,
                                      "--no-progress", "--conventions"]) == 0
    assert "n/a (no prob/ maps)" in capsys.readouterr().out
    assert json.load(open(json_path))["conventions"]["f1_best_threshold"] is None


def test_conventions_name_a_wrong_size_prob_map(export, tmp_path, capsys):
    split, export_dir = export
    broken = str(tmp_path / "broken")
    shutil.copytree(export_dir, broken)
    victim = sorted(os.listdir(os.path.join(split, "fake")))[-1]
    cv2.imwrite(os.path.join(broken, "prob", victim), np.zeros((3, 3), np.uint8))
    assert evaluate_predictions.main(["--pred", broken, "--gt", split, "--no-progress",
                                      "--conventions"]) == 1
    err = capsys.readouterr().err
    assert victim in err and "probability map is 3x3" in err
