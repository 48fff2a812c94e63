"""tools/compare_robustness.py on hand-written robustness.json files."""
import json

import pytest

from tool_helpers import load_tool

compare = load_tool("compare_robustness")


def _metrics(auc, f1, iou, false_alarm):
    return {"auc": auc, "f1": f1, "iou": iou, "score": (auc + f1 + iou) / 3,
            "real_false_alarm": false_alarm, "num_real": 10, "num_fake": 10}


def _run(folder, clean, jpeg70):
    folder.mkdir(parents=True)
    (folder / "robustness.json").write_text(json.dumps(
        {"clean": _metrics(*clean), "jpeg": {"70": _metrics(*jpeg70)}}))
    return str(folder)


def test_mean_worst_and_kept_by_hand(tmp_path, capsys):
    a = _run(tmp_path / "a", (1.0, 0.8, 0.8, 0.0), (0.5, 0.4, 0.4, 0.2))
    b = _run(tmp_path / "b", (0.8, 0.6, 0.5, 0.1), (0.6, 0.3, 0.4, 0.4))
    c = _run(tmp_path / "c", (0.9, 0.7, 0.6, 0.0), (0.9, 0.7, 0.6, 0.0))
    assert compare.main(["--recipe", "plain", a, b, "--recipe", "degraded", c,
                         "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    payload = json.load(open(tmp_path / "out" / "robustness_comparison.json"))
    plain = payload["summary"]["plain"]["jpeg 70"]
    assert plain["auc"]["mean"] == pytest.approx(0.55) and plain["auc"]["worst"] == 0.5
    # the false-alarm rate's worst seed is its highest
    assert plain["real_false_alarm"]["worst"] == 0.4
    # kept per seed: 0.5 / 1.0 and 0.6 / 0.8
    assert plain["auc"]["kept_mean"] == pytest.approx((0.5 + 0.75) / 2)
    assert plain["auc"]["kept_worst"] == pytest.approx(0.5)
    assert plain["iou"]["kept_worst"] == pytest.approx(0.5)  # 0.4 / 0.8 against 0.4 / 0.5
    assert payload["summary"]["degraded"]["jpeg 70"]["iou"]["kept_mean"] == pytest.approx(1.0)
    assert "| jpeg 70 | plain | 55.0 (50.0) |" in out
    assert (tmp_path / "out" / "robustness_comparison.png").stat().st_size > 0


def test_runs_with_other_conditions_are_refused(tmp_path):
    a = _run(tmp_path / "a", (1.0, 0.8, 0.8, 0.0), (0.5, 0.4, 0.4, 0.2))
    other = tmp_path / "other"
    other.mkdir()
    (other / "robustness.json").write_text(json.dumps(
        {"clean": _metrics(1, 1, 1, 0), "resize": {"0.5": _metrics(1, 1, 1, 0)}}))
    with pytest.raises(SystemExit, match="compare like with like"):
        compare.main(["--recipe", "x", a, str(other), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="not found"):
        compare.main(["--recipe", "x", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit):  # a recipe without runs: argparse error (exit 2)
        compare.main(["--recipe", "x", "--output", str(tmp_path / "out")])
