"""Suspicious or inconsistent evaluation inputs: scores outside [0, 1], ground truth of the wrong size."""
import logging
import re

import cv2
import numpy as np
import pytest

from ddl_mask2former.evaluation import (
    count_against_ground_truth,
    read_ground_truth,
    score_export,
)
from ddl_mask2former.evaluation.export import read_predictions
from eval_helpers import write_split
from tool_helpers import load_tool

EXPORT_LOGGER = "ddl_mask2former.evaluation.export"


def _write_lines(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def test_scores_outside_unit_interval_warn_naming_file_and_line(tmp_path, caplog):
    path = _write_lines(tmp_path / "prediction.txt",
                        ["a.png,0.25", "b.png,1.75", "c.png,-0.5", "d.png,1.0", "e.png,0"])
    with caplog.at_level(logging.WARNING, logger=EXPORT_LOGGER):
        scores = read_predictions(path)
    # Kept as given: AUC only ranks scores.
    assert scores == {"a.png": 0.25, "b.png": 1.75, "c.png": -0.5, "d.png": 1.0, "e.png": 0.0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per file, not one per line
    assert f"{path}, line 2: score of b.png is 1.75, outside [0, 1]" in warnings[0]
    assert "2 such score(s)" in warnings[0]


def test_scores_inside_unit_interval_do_not_warn(tmp_path, caplog):
    path = _write_lines(tmp_path / "prediction.txt", ["a.png,0.0", "b.png,1", "c.png,0.5"])
    with caplog.at_level(logging.WARNING, logger=EXPORT_LOGGER):
        read_predictions(path)
    assert not caplog.records


def test_evaluate_predictions_reports_out_of_range_scores(tmp_path, capsys, caplog):
    split = tmp_path / "split"
    dicts = write_split(str(split))
    export = tmp_path / "export"
    export.mkdir()
    names = sorted(d["file_name"].rsplit("/", 1)[1] for d in dicts)
    # Logits instead of probabilities: the ranking, and so the AUC, is still meaningful.
    _write_lines(export / "prediction.txt",
                 [f"{name},{3.0 if name.startswith('fake') else -3.0}" for name in names])
    evaluate_predictions = load_tool("evaluate_predictions")
    with caplog.at_level(logging.WARNING, logger=EXPORT_LOGGER):
        assert evaluate_predictions.main(["--pred", str(export), "--gt", str(split),
                                          "--no-progress"]) == 0
    warning = caplog.records[-1].getMessage()
    assert f"{export / 'prediction.txt'}, line 1: score of {names[0]} is 3.0, outside [0, 1]" in warning
    assert "100.00" in capsys.readouterr().out  # AUC still computed from the ranking


def test_ground_truth_helper_reads_checks_size_and_counts(tmp_path):
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 2:6] = 255
    mask_path = str(tmp_path / "m.png")
    cv2.imwrite(mask_path, mask)
    gt = read_ground_truth(mask_path, (6, 8))
    assert gt.dtype == bool and gt.sum() == 8
    assert not read_ground_truth(None, (6, 8)).any()  # a real image
    pred = np.zeros((6, 8), bool)
    pred[1:4, 2:4] = True  # 4 forged pixels found, 2 false alarms
    assert count_against_ground_truth(pred, mask_path) == (4, 2, 4)
    assert count_against_ground_truth(pred, None) == (0, 6, 0)
    with pytest.raises(ValueError, match=r"m.png: ground-truth mask is 6x8 but the image x.png is 5x8"):
        read_ground_truth(mask_path, (5, 8), image_name="x.png")


def test_scoring_names_a_ground_truth_mask_of_the_wrong_size(tmp_path):
    split = tmp_path / "split"
    dicts = write_split(str(split))
    fake = next(d for d in dicts if d["label"] == 1)
    export = tmp_path / "export"
    (export / "mask").mkdir(parents=True)
    for record in dicts:
        name = record["file_name"].rsplit("/", 1)[1]
        cv2.imwrite(str(export / "mask" / name),
                    np.zeros((record["height"], record["width"]), np.uint8))
    # The image and its prediction agree on the size; only the ground truth is off.
    cv2.imwrite(fake["mask_file"], np.zeros((fake["height"] + 1, fake["width"]), np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"{fake['mask_file']}: mask is")):
        score_export(str(export), str(split), num_workers=1)
