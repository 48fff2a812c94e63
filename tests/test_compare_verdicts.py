"""tools/compare_verdicts.py end to end on a tiny generated split: one model run, every rule fitted
at each target false-positive rate, config overrides right after a dataset list."""
import json
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from ddl_mask2former.config import load_config
from ddl_mask2former.data.ddl_dataset import register_ddl_split
from ddl_mask2former.data.synthetic import generate_ddl_dataset
from ddl_mask2former.modeling.verdict import MASK_POLICIES, RULES

from tool_helpers import load_tool

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "ddl_mask2former_quickstart_R18.yaml"
CALIBRATION_SET, EVAL_SET = "compare_verdicts_calib", "compare_verdicts_eval"


@pytest.fixture(scope="module")
def datasets_and_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_verdicts")
    generate_ddl_dataset(str(root / "DDL-I"), 10, 6, seed=5, min_size=64, max_size=80, workers=1,
                         difficulty="easy")
    register_ddl_split(CALIBRATION_SET, str(root / "DDL-I" / "train"), cache_dir=None)
    register_ddl_split(EVAL_SET, str(root / "DDL-I" / "val"), cache_dir=None)
    torch.manual_seed(0)
    model = build_model(load_config(str(CONFIG), ["MODEL.DEVICE", "cpu"]))
    weights = root / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 9}, weights)
    yield root, str(weights)
    for name in (CALIBRATION_SET, EVAL_SET):
        DatasetCatalog.remove(name)


def test_every_rule_at_every_target_from_one_run(datasets_and_weights, capsys):
    root, weights = datasets_and_weights
    out = root / "verdicts.json"
    load_tool("compare_verdicts").main([
        "--config-file", str(CONFIG), "--calibration", CALIBRATION_SET, "--target-fpr", "0.2", "0.6",
        "--json", str(out), "--eval", EVAL_SET,
        # the overrides follow the dataset list directly
        "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"])
    results = json.loads(out.read_text())
    assert results["eval"] == [EVAL_SET] and results["target_fpr"] == [0.2, 0.6]
    rules = results["rules"]
    assert set(rules) == {f"{rule}/{policy}@{target}" for rule in RULES for policy in MASK_POLICIES
                          for target in ("0.2", "0.6")}
    for rule in RULES:
        strict, loose = rules[f"{rule}/gate@0.2"], rules[f"{rule}/gate@0.6"]
        assert strict["target_fpr"] == 0.2 and loose["target_fpr"] == 0.6
        # a higher false-positive budget never raises the threshold; the fit keeps within its target
        assert loose["threshold"] <= strict["threshold"]
        assert strict["calibration_fpr"] <= 0.2 and loose["calibration_fpr"] <= 0.6
        # the model ran once: AUC does not depend on the target
        assert strict["auc"] == loose["auc"]
    table = capsys.readouterr().out
    assert "target FPR" in table
    assert {row.split("|")[1].strip() for row in table.splitlines() if row.startswith("|") and "---" not in row} \
        == {"target FPR", "20", "60"}


@pytest.mark.parametrize("argv, message", [
    (["--target-fpr", "1.0"], "--target-fpr 1.0: a false-positive rate in [0, 1)"),
    (["--target-fpr", "0.05", "-0.1"], "--target-fpr -0.1: a false-positive rate in [0, 1)"),
])
def test_bad_targets_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_tool("compare_verdicts").parse_args(
            ["--config-file", str(CONFIG), "--calibration", "a", "--eval", "b", *argv])
    assert message in capsys.readouterr().err


def test_overrides_are_taken_back_from_a_dataset_list():
    args = load_tool("compare_verdicts").parse_args(
        ["--config-file", str(CONFIG), "--calibration", "a_calib", "--eval", "b_val", "c_val",
         "MODEL.WEIGHTS", "w.pth", "SOLVER.BASE_LR", "0.1"])
    assert args.eval == ["b_val", "c_val"] and args.calibration == ["a_calib"]
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "SOLVER.BASE_LR", "0.1"]

