"""Pictures of a run: the learning curve from metrics.json and the contact sheet of an export."""
import json
import os

import cv2
import numpy as np
import pytest

from ddl_mask2former.data.synthetic import generate_ddl_dataset
from ddl_mask2former.evaluation.export import encode_prob_u8, write_predictions
from ddl_mask2former.report import plot_learning_curve, read_metrics, write_contact_sheet


def _metrics_json(path):
    rows = [{"iteration": i, "total_loss": 30.0 / (1 + i / 10), "loss_det": 0.07} for i in range(9, 100, 10)]
    rows.insert(5, {"iteration": 49, "ddl/AUC": 71.0, "ddl/F1": 40.0, "ddl/IoU": 30.0})
    rows.append({"iteration": 99, "ddl/AUC": 90.5, "ddl/F1": 70.0, "ddl/IoU": 61.0})
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def test_learning_curve_reads_training_and_evaluation_rows(tmp_path):
    metrics = _metrics_json(tmp_path / "metrics.json")
    train, evaluation = read_metrics(str(metrics))
    assert len(train) == 10 and [row["iteration"] for row in evaluation] == [49, 99]
    out = plot_learning_curve(str(metrics), str(tmp_path / "pics" / "curve.png"), "toy run")
    picture = cv2.imread(out)
    assert picture is not None and picture.shape[0] > 200 and picture.shape[1] > 500


def test_learning_curve_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        read_metrics(str(tmp_path / "missing.json"))
    bad = tmp_path / "metrics.json"
    bad.write_text('{"iteration": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.json, line 2: not JSON"):
        read_metrics(str(bad))


def test_contact_sheet_shows_fakes_and_reals_of_an_export(tmp_path):
    generate_ddl_dataset(str(tmp_path / "DDL-I"), 0, 6, seed=1, min_size=48, max_size=80)
    val = tmp_path / "DDL-I" / "val"
    export = tmp_path / "export"
    os.makedirs(export / "prob")
    scores = []
    for folder in ("fake", "real"):
        for name in sorted(os.listdir(val / folder)):
            height, width = cv2.imread(str(val / folder / name)).shape[:2]
            prob = np.zeros((height, width), np.float32)
            prob[: height // 2] = 0.9
            cv2.imwrite(str(export / "prob" / name), encode_prob_u8(prob))
            scores.append((name, 0.8 if folder == "fake" else 0.1))
    write_predictions(str(export / "prediction.txt"), scores)
    out = write_contact_sheet(str(export), str(val), str(tmp_path / "sheet.png"), num_fake=2, num_real=1,
                              row_height=60)
    sheet = cv2.imread(out)
    # A title strip, then three rows of (caption strip + 60 px pictures + 4 px gap).
    assert sheet.shape[0] == 22 + 3 * (22 + 60 + 4)
    with pytest.raises(ValueError, match="no prediction matches"):
        write_predictions(str(export / "prediction.txt"), [("other.png", 0.5)])
        write_contact_sheet(str(export), str(val), str(tmp_path / "sheet2.png"))
