"""The README's main job, `make quickstart` (tools/quickstart.py), end to end at toy size."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run_quickstart(out, *options):
    """tools/quickstart.py at toy size (tiny images and data); fails the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "quickstart.py"), "--out", str(out),
         "--num-val", "4", "--image-size", "96", "128", "--demo-images", "2", *options],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_quickstart_runs_every_step_and_reports(tmp_path):
    out = tmp_path / "qs"
    # trailing KEY VALUE pairs reach training (here the degradation augmentation, which this
    # run then exercises end to end)
    # (and the varied generator's families and chains reach the data)
    result = _run_quickstart(out, "--generator", "varied", "--families", "splice", "warp", "--chains", "jpeg",
                             "--num-train", "6", "--iters", "2", "INPUT.DEGRADATION.ENABLED", "True")
    config = yaml.safe_load((out / "model_main" / "config.yaml").read_text())
    assert config["INPUT"]["DEGRADATION"]["ENABLED"] is True
    data = out / "data" / "DDL-I"
    assert len(list((data / "train" / "fake").glob("*.png"))) == 3
    records = [json.loads(line) for line in (data / "manifest_train.jsonl").read_text().splitlines()]
    assert all(r["post"]["chain"] == "jpeg" for r in records)
    assert {f for r in records if r["label"] == 1 for f in r["families"]} <= {"splice", "warp"}
    assert (out / "model_main" / "model_final.pth").is_file()
    export = out / "model_main" / "export"
    assert len((export / "prediction.txt").read_text().splitlines()) == 4
    assert len(list((export / "mask").glob("*.png"))) == 4
    scores = json.loads((out / "model_main" / "scores.json").read_text())
    assert scores["num_real"] + scores["num_fake"] == 4
    assert 0.0 <= scores["auc"] <= 1.0 and 0.0 <= scores["iou"] <= 1.0
    demo_lines = (out / "demo" / "predictions.jsonl").read_text().splitlines()
    assert len(demo_lines) == 2 and all(Path(json.loads(l)["output"]).is_file() for l in demo_lines)
    # The closing summary names the metrics and where everything went.
    assert "AUC" in result.stdout and "checkpoint:" in result.stdout and "demo:" in result.stdout
    assert "tools/ensemble.py" in result.stdout  # the ready ensemble command
    # Pictures: the learning curve (with the evaluations along the way) and the val contact sheet.
    assert (out / "model_main" / "learning_curve.png").is_file()
    assert (out / "model_main" / "val_contact_sheet.png").is_file()
    assert "learning_curve.png" in result.stdout and "val_contact_sheet.png" in result.stdout
    # The terminal shows condensed progress and each evaluation, not every loss term.
    assert "val after iter" in result.stdout and "loss_dice_0" not in result.stdout


def test_quickstart_rejects_bad_arguments():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "quickstart.py"), "--num-val", "x"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--num-val" in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "quickstart.py"), "SEED"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "KEY VALUE pairs" in result.stderr


@pytest.mark.slow
def test_quickstart_ensemble_trains_a_second_model_and_fuses(tmp_path):
    out = tmp_path / "qs"
    result = _run_quickstart(out, "--num-train", "4", "--iters", "1", "--ensemble")
    fused = out / "ensemble"
    assert len((fused / "prediction.txt").read_text().splitlines()) == 4
    assert len(list((fused / "prob").glob("*.png"))) == 4
    # Both models and their fusion appear in the closing table.
    table = result.stdout.split("Synthetic val split")[1]
    assert "quickstart_swin" in table and "quickstart_R18" in table and "ensemble" in table
