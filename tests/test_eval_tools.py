"""tools/evaluate_predictions.py and tools/ensemble.py on small generated splits."""
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from ddl_mask2former.evaluation import DDLEvaluator, fuse_exports, score_export, search_weights
from ddl_mask2former.evaluation.export import read_predictions

from eval_helpers import make_outputs, write_split, write_split_dicts
from tool_helpers import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ensemble = load_tool("ensemble")
evaluate_predictions = load_tool("evaluate_predictions")


def _export(dicts, outputs, export_dir):
    evaluator = DDLEvaluator("eval_tools_test", export_dir=str(export_dir))
    evaluator.reset()
    evaluator.process(dicts, outputs)
    return evaluator.evaluate()["ddl"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A split and two models' exports of it (different random outputs)."""
    root = tmp_path_factory.mktemp("eval_tools")
    split = str(root / "split")
    dicts = write_split(split, num_real=5, num_fake=7)
    first = _export(dicts, make_outputs(dicts, seed=1), root / "model_a")
    _export(dicts, make_outputs(dicts, seed=2), root / "model_b")
    return split, str(root / "model_a"), str(root / "model_b"), first


def _copy_export(source, target):
    import shutil

    shutil.copytree(source, target)
    return str(target)


def test_evaluate_predictions_json_matches_evaluator(exports, tmp_path, capsys):
    split, model_a, _, evaluator_results = exports
    json_path = str(tmp_path / "out" / "metrics.json")
    assert evaluate_predictions.main(["--pred", model_a, "--gt", split, "--json", json_path,
                                      "--no-progress"]) == 0
    assert "F1 (pixel)" in capsys.readouterr().out
    payload = json.load(open(json_path))
    assert set(evaluate_predictions.JSON_KEYS) <= set(payload)
    for key, name in (("auc", "AUC"), ("f1", "F1"), ("iou", "IoU"), ("score", "score"),
                      ("f1_pixel", "F1_pixel"), ("iou_pixel", "IoU_pixel")):
        assert 100 * payload[key] == pytest.approx(evaluator_results[name], abs=1e-12)
    assert (payload["num_real"], payload["num_fake"]) == (5, 7)


def test_evaluate_predictions_runs_from_any_folder(exports, tmp_path):
    split, model_a, _, _ = exports
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate_predictions.py"),
                           "--pred", model_a, "--gt", split, "--json", "m.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.load(open(tmp_path / "m.json"))["num_fake"] == 7
    assert "scoring" in done.stderr  # the progress bar


def _break(export_dir, how):
    prediction = os.path.join(export_dir, "prediction.txt")
    lines = open(prediction).read().splitlines()
    if how == "missing score":
        lines = [line for line in lines if not line.startswith("fake_007.png")]
    elif how == "extra score":
        lines.append("stranger.png,0.5")
    elif how == "malformed":
        lines[2] = lines[2].split(",")[0] + ";0.3"
    elif how == "wrong size":
        cv2.imwrite(os.path.join(export_dir, "mask", "real_001.png"), np.zeros((5, 5), np.uint8))
    elif how == "missing mask":
        os.remove(os.path.join(export_dir, "mask", "fake_007.png"))
    open(prediction, "w").write("\n".join(lines) + "\n")


@pytest.mark.parametrize("how, message", [
    ("missing score", "1 images have no scores, e.g. fake_007.png"),
    ("extra score", "1 scores for images not in the split, e.g. stranger.png"),
    ("malformed", "line 3: expected 'image_name.png,score', got 'fake_007.png;0.3'"),
    ("wrong size", "real_001.png: mask is 5x5 but image real_001.png is 40x28"),
    ("missing mask", "1 images have no masks, e.g. fake_007.png"),
])
def test_evaluate_predictions_errors_name_the_image(exports, tmp_path, capsys, how, message):
    split, model_a, _, _ = exports
    broken = _copy_export(model_a, tmp_path / "broken")
    _break(broken, how)
    assert evaluate_predictions.main(["--pred", broken, "--gt", split, "--no-progress"]) == 1
    assert message in capsys.readouterr().err


def test_allow_missing_scores_missing_as_zero_and_empty(exports, tmp_path, capsys):
    split, model_a, _, _ = exports
    broken = _copy_export(model_a, tmp_path / "broken")
    _break(broken, "missing score")
    _break(broken, "missing mask")
    metrics = score_export(broken, split, allow_missing=True)
    assert metrics["num_missing_scores"] == 1 and metrics["num_missing_masks"] == 1
    # the same as an export whose score is 0 and whose mask is empty
    patched = _copy_export(model_a, tmp_path / "patched")
    lines = [line if not line.startswith("fake_007.png") else "fake_007.png,0.0"
             for line in open(os.path.join(patched, "prediction.txt")).read().splitlines()]
    open(os.path.join(patched, "prediction.txt"), "w").write("\n".join(lines) + "\n")
    mask_path = os.path.join(patched, "mask", "fake_007.png")
    cv2.imwrite(mask_path, np.zeros_like(cv2.imread(mask_path, -1)))
    expected = score_export(patched, split)
    for key in ("auc", "f1", "iou", "f1_pixel", "iou_pixel", "score"):
        assert metrics[key] == expected[key]
    assert evaluate_predictions.main(["--pred", broken, "--gt", split, "--allow-missing",
                                      "--no-progress"]) == 0
    assert "1 images had no prediction (scores)" in capsys.readouterr().out


def _read_export(export_dir):
    names = sorted(os.listdir(os.path.join(export_dir, "prob")))
    prob = {n: cv2.imread(os.path.join(export_dir, "prob", n), -1) for n in names}
    mask = {n: cv2.imread(os.path.join(export_dir, "mask", n), -1) for n in names}
    return read_predictions(os.path.join(export_dir, "prediction.txt")), prob, mask


def test_ensemble_one_zero_reproduces_first_input(exports, tmp_path):
    split, model_a, model_b, _ = exports
    out = str(tmp_path / "fused")
    assert ensemble.main(["--inputs", model_a, model_b, "--det-weights", "1", "0",
                          "--loc-weights", "2.5", "0", "--out", out, "--no-progress"]) == 0
    fused, original = _read_export(out), _read_export(model_a)
    assert fused[0] == original[0]
    assert open(os.path.join(out, "prediction.txt")).read() == \
        open(os.path.join(model_a, "prediction.txt")).read()
    for name in original[1]:
        np.testing.assert_array_equal(fused[1][name], original[1][name])
        np.testing.assert_array_equal(fused[2][name], original[2][name])


def test_ensemble_one_one_is_the_mean(exports, tmp_path):
    split, model_a, model_b, _ = exports
    out = str(tmp_path / "fused")
    json_path = str(tmp_path / "fused.json")
    assert ensemble.main(["--inputs", model_a, model_b, "--det-weights", "1", "1",
                          "--loc-weights", "1", "1", "--out", out, "--gt", split, "--zip",
                          "--json", json_path, "--no-progress"]) == 0
    fused, first, second = _read_export(out), _read_export(model_a), _read_export(model_b)
    for name, score in fused[0].items():
        assert score == (first[0][name] + second[0][name]) / 2
    for name, codes in fused[1].items():
        # decoded centres (q + 0.5) / 256 averaged and re-encoded: floor((q1 + q2) / 2)
        mean = (first[1][name].astype(int) + second[1][name].astype(int)) // 2
        np.testing.assert_array_equal(codes, mean)
        np.testing.assert_array_equal(fused[2][name] == 255, mean >= 128)
    assert os.path.isfile(os.path.join(out, "submission.zip"))
    assert json.load(open(json_path))["metrics"] == \
        pytest.approx(score_export(out, split), nan_ok=True)


def test_ensemble_det_only_and_bad_weights(exports, tmp_path, capsys):
    split, model_a, model_b, _ = exports
    out = str(tmp_path / "det_only")
    fuse_exports([model_a, model_b], out, det_weights=[1, 2.5])
    assert sorted(os.listdir(out)) == ["prediction.txt"]
    scores_a = read_predictions(os.path.join(model_a, "prediction.txt"))
    scores_b = read_predictions(os.path.join(model_b, "prediction.txt"))
    for name, score in read_predictions(os.path.join(out, "prediction.txt")).items():
        assert score == pytest.approx((scores_a[name] + 2.5 * scores_b[name]) / 3.5)
    assert ensemble.main(["--inputs", model_a, model_b, "--det-weights", "1", "-1",
                          "--out", out]) == 1
    assert "non-negative" in capsys.readouterr().err
    assert ensemble.main(["--inputs", model_a, model_b, "--loc-weights", "1",
                          "--out", out]) == 1
    assert "expected 2 (one per input)" in capsys.readouterr().err


def test_search_with_three_inputs_agrees_with_scoring_fused_exports(exports, tmp_path):
    # three inputs take the per-pixel path (two use code-pair tables): same criterion
    split, model_a, model_b, _ = exports
    inputs = [model_a, model_b, model_a]
    result = search_weights(inputs, split, step=0.5, num_workers=1)
    assert len(result["loc"]) == 6
    for index, entry in enumerate(result["loc"]):
        out = str(tmp_path / f"fused_{index}")
        fuse_exports(inputs, out, loc_weights=entry["weights"])
        scored = score_export(out, split)
        for key in ("f1", "iou", "f1_pixel", "iou_pixel", "real_forged_frac"):
            assert entry[key] == scored[key], (entry["weights"], key)


def test_search_agrees_with_scoring_fused_exports(exports, tmp_path, capsys):
    split, model_a, model_b, _ = exports
    result = search_weights([model_a, model_b], split, step=0.5, num_workers=2)
    assert [e["weights"] for e in result["loc"]] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    for entry in result["loc"]:
        out = str(tmp_path / f"fused_{entry['weights'][0]}")
        fuse_exports([model_a, model_b], out, det_weights=entry["weights"],
                     loc_weights=entry["weights"])
        scored = score_export(out, split)
        for key in ("f1", "iou", "f1_pixel", "iou_pixel", "real_forged_frac"):
            assert entry[key] == scored[key], (entry["weights"], key)
        det_entry = next(e for e in result["det"] if e["weights"] == entry["weights"])
        assert det_entry["auc"] == scored["auc"]
    best = max(result["loc"], key=lambda e: e["f1"] + e["iou"])
    assert result["best_loc_weights"] == best["weights"]
    assert result["best"]["score"] == pytest.approx(
        (result["best"]["auc"] + best["f1"] + best["iou"]) / 3)
    assert ensemble.main(["--inputs", model_a, model_b, "--search", split, "--search-step",
                          "0.5", "--no-progress"]) == 0
    assert "best localization weights" in capsys.readouterr().out


# --by: a hand-made split of 10x10 images, every fake forged on a 4x5 rectangle
_BY_SIZE = (10, 10)
# name -> (label, fake_prob, predicted mask: "perfect", "empty" or a number of marked pixels)
_BY_IMAGES = {
    "r0.png": (0, 0.1, 0), "r1.png": (0, 0.7, 2), "r2.png": (0, 0.3, 0), "r3.png": (0, 0.5, 0),
    "f0.png": (1, 0.9, "perfect"), "f1.png": (1, 0.8, "perfect"),
    "f2.png": (1, 0.2, "empty"), "f3.png": (1, 0.6, "empty"),
}
_BY_MANIFEST = [  # r3 is not listed; f3 is a classic record (no families, shapes or chain)
    {"file": "r0.png", "label": 0, "post": {"chain": "jpeg"}, "source": "coffee"},
    {"file": "r1.png", "label": 0, "post": {"chain": "jpeg"}, "source": "coffee"},
    {"file": "r2.png", "label": 0, "post": {"chain": "none"}, "source": "procedural"},
    {"file": "f0.png", "label": 1, "families": ["splice"], "post": {"chain": "jpeg"},
     "regions": [{"family": "splice", "shape": "ellipse"}], "source": "coffee"},
    {"file": "f1.png", "label": 1, "families": ["splice", "warp"], "post": {"chain": "none"},
     "regions": [{"family": "splice", "shape": "ellipse"}, {"family": "warp", "shape": "blob"}],
     "source": "procedural"},
    {"file": "f2.png", "label": 1, "families": ["warp"], "post": {"chain": "jpeg"},
     "regions": [{"family": "warp", "shape": "blob"}], "source": "coffee"},
    {"file": "f3.png", "label": 1, "forgery_type": "face_swap", "regions": ["face_swap"],
     "source": "astronaut"},
]


def _write_by_split(root):
    """Split, manifest beside it and an export: f0/f1 perfect masks, f2/f3 empty, r1 2 % marked."""
    split, export = root / "val", root / "export"
    for folder in (split / "real", split / "fake", split / "masks", export / "mask"):
        folder.mkdir(parents=True)
    forged = np.zeros(_BY_SIZE, np.uint8)
    forged[2:6, 3:8] = 255
    lines = []
    for name, (label, fake_prob, predicted) in _BY_IMAGES.items():
        cv2.imwrite(str(split / ("fake" if label else "real") / name),
                    np.full(_BY_SIZE + (3,), 128, np.uint8))
        if label:
            cv2.imwrite(str(split / "masks" / name), forged)
        mask = forged.copy() if predicted == "perfect" else np.zeros(_BY_SIZE, np.uint8)
        if not isinstance(predicted, str):
            mask.flat[:predicted] = 255
        cv2.imwrite(str(export / "mask" / name), mask)
        lines.append(f"{name},{fake_prob}\n")
    (export / "prediction.txt").write_text("".join(lines))
    (root / "manifest_val.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in _BY_MANIFEST))
    return str(split), str(export)


def _metrics(num_real, num_fake, auc, f1, real_false_alarm=None):
    expected = {"num_real": num_real, "num_fake": num_fake, "auc": auc, "f1": f1, "iou": f1}
    if real_false_alarm is not None:
        expected["real_false_alarm"] = real_false_alarm
    return expected


def test_evaluate_predictions_by_family_chain_and_none_groups(tmp_path, capsys):
    split, export = _write_by_split(tmp_path)
    json_path = str(tmp_path / "metrics.json")
    assert evaluate_predictions.main(["--pred", export, "--gt", split, "--by", "family", "shape",
                                      "chain", "generator", "--json", json_path,
                                      "--no-progress"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the notes above the tables are wrapped
    assert "a group without real images of its own is scored with all of them" in out
    assert "100.00*" in out and "its fakes against all reals" in out
    assert "1 images of" in out and "r3.png" in out  # not in the manifest: named, not dropped
    by = json.load(open(json_path))["by"]
    # forgery keys: the group's fakes against all 4 reals (scores 0.1, 0.7, 0.3, 0.5);
    # warp: 0.8 beats 4 reals, 0.2 beats 1 -> AUC 5/8; f3 (classic, no families) is (none)
    expected_family = {"splice": _metrics(4, 2, 1.0, 1.0), "warp": _metrics(4, 2, 5 / 8, 0.5),
                       "(none)": _metrics(4, 1, 3 / 4, 0.0)}
    for key, groups in (("family", expected_family),
                        ("shape", {"blob": expected_family["warp"],
                                   "ellipse": expected_family["splice"],
                                   "(none)": expected_family["(none)"]})):
        assert list(by[key]) == list(groups)
        for group, expected in groups.items():
            assert "real_false_alarm" not in by[key][group]
            assert by[key][group]["auc_vs_all_reals"] == 1.0
            for entry, value in expected.items():
                assert by[key][group][entry] == pytest.approx(value), (key, group, entry)
    # image keys: reals and fakes with that chain; r3 (unlisted) and f3 (no post) are (none);
    # jpeg: f0 (0.9) beats r0 and r1, f2 (0.2) beats r0 -> 3/4; r1 has 2 % marked
    expected_chain = {"jpeg": _metrics(2, 2, 3 / 4, 0.5, 0.5),
                      "none": _metrics(1, 1, 1.0, 1.0, 0.0),
                      "(none)": _metrics(1, 1, 1.0, 0.0, 0.0)}
    assert list(by["chain"]) == list(expected_chain)
    for group, expected in expected_chain.items():
        for entry, value in expected.items():
            assert by["chain"][group][entry] == pytest.approx(value), (group, entry)
    assert by["chain"]["jpeg"]["auc_vs_all_reals"] == 0.0
    # no generator anywhere: one (none) group of all fakes against all reals, the whole split
    overall = score_export(export, split)
    assert list(by["generator"]) == ["(none)"]
    for entry in ("num_real", "num_fake", "auc", "f1", "iou"):
        assert by["generator"]["(none)"][entry] == pytest.approx(overall[entry])
    assert "real_false_alarm" not in by["generator"]["(none)"]


def test_evaluate_predictions_by_manifest_errors(tmp_path, capsys):
    split, export = _write_by_split(tmp_path)
    os.rename(tmp_path / "manifest_val.jsonl", tmp_path / "other.jsonl")
    assert evaluate_predictions.main(["--pred", export, "--gt", split, "--by", "family",
                                      "--no-progress"]) == 1
    assert str(tmp_path / "manifest_val.jsonl") in capsys.readouterr().err
    # an entry for a file the split lacks, or with another label: an error naming it
    records = _BY_MANIFEST + [{"file": "gone.png", "label": 1}]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluate_predictions.main(["--pred", export, "--gt", split, "--by", "chain",
                                      "--manifest", str(tmp_path / "other.jsonl"),
                                      "--no-progress"]) == 1
    assert "gone.png" in capsys.readouterr().err
    records = [dict(r, label=1) if r["file"] == "r0.png" else r for r in _BY_MANIFEST]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluate_predictions.main(["--pred", export, "--gt", split, "--by", "chain",
                                      "--manifest", str(tmp_path / "other.jsonl"),
                                      "--no-progress"]) == 1
    assert "r0.png" in capsys.readouterr().err


def test_evaluator_groups_equal_offline_breakdown(tmp_path):
    """TEST.EVAL_GROUP_KEY and --by give the same groups and numbers on the same images."""
    split = str(tmp_path / "val")
    dicts = write_split(split, num_real=7, num_fake=9)
    outputs = make_outputs(dicts, seed=5)
    manifest = []
    for index, record in enumerate(dicts):
        # a source shared by both classes (cam), reals only (web), fakes only (gan), none
        source = (["cam", "web", None] if record["label"] == 0 else ["cam", "gan", None])[index % 3]
        family = ["splice", "warp"][index % 2] if record["label"] and index % 5 else None
        record.update(source=source, family=family)
        entry = {"file": os.path.basename(record["file_name"]), "label": record["label"]}
        if source is not None:
            entry["source"] = source
        if family is not None:
            entry["families"] = [family]
        manifest.append(entry)
    (tmp_path / "manifest_val.jsonl").write_text(
        "".join(json.dumps(entry) + "\n" for entry in manifest))
    export, json_path = str(tmp_path / "export"), str(tmp_path / "metrics.json")
    in_process = {}
    for key in ("source", "family"):
        evaluator = DDLEvaluator("eval_tools_groups", export_dir=export, group_key=key)
        evaluator.reset()
        evaluator.process(dicts, outputs)
        in_process[key] = evaluator.evaluate()["ddl_groups"]
    assert evaluate_predictions.main(["--pred", export, "--gt", split, "--by", "source",
                                      "family", "--json", json_path, "--no-progress"]) == 0
    by = json.load(open(json_path))["by"]
    assert list(by["source"]) == ["cam", "gan", "web", "(none)"]
    assert by["source"]["gan"]["auc_vs_all_reals"] == 1.0
    assert list(by["family"]) == ["splice", "warp", "(none)"]
    names = {"auc": "AUC", "f1": "F1", "iou": "IoU", "score": "score", "f1_pixel": "F1_pixel",
             "iou_pixel": "IoU_pixel", "real_forged_frac": "real_forged_frac",
             "real_false_alarm": "real_false_alarm", "num_real": "num_real",
             "num_fake": "num_fake"}
    for key, groups in by.items():
        expected = {f"{group}/{names[entry]}": value for group, metrics in groups.items()
                    for entry, value in metrics.items() if entry in names}
        assert set(in_process[key]) == set(expected), key
        for name, value in expected.items():
            found = in_process[key][name]
            if value is None:  # NaN in the JSON: a figure the group cannot define
                assert math.isnan(found), (key, name)
            elif name.endswith(("/num_real", "/num_fake")):
                assert found == value, (key, name)
            else:
                assert found == pytest.approx(100 * value, abs=1e-12), (key, name)


def test_evaluate_predictions_by_on_a_generated_split(tmp_path, capsys):
    """Varied generator: every fake counts once per family it holds; reals are in each group."""
    from ddl_mask2former.data.synthetic import generate_split

    summary = generate_split(str(tmp_path), "val", 12, seed=0, min_size=64, max_size=96,
                             variety={})
    split = summary["dir"]
    dicts = write_split_dicts(split)
    export = tmp_path / "export"
    _export(dicts, make_outputs(dicts, seed=3), export)
    json_path = str(tmp_path / "metrics.json")
    assert evaluate_predictions.main(["--pred", str(export), "--gt", split, "--by", "family",
                                      "chain", "--json", json_path, "--no-progress"]) == 0
    assert summary["manifest"] in capsys.readouterr().out
    by = json.load(open(json_path))["by"]
    records = [json.loads(line) for line in open(summary["manifest"])]
    fakes = [r for r in records if r["label"] == 1]
    assert {family: group["num_fake"] for family, group in by["family"].items()} == {
        family: sum(family in r["families"] for r in fakes)
        for family in {f for r in fakes for f in r["families"]}}
    assert all(group["num_real"] == summary["num_real"] for group in by["family"].values())
    # a chain group without reals of its own is scored with all reals: count only its fakes
    assert sum(group["num_fake"] + (0 if group["auc_vs_all_reals"] else group["num_real"])
               for group in by["chain"].values()) == 12
