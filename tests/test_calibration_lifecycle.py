"""Which fit a checkpoint's verdict carries and when evaluation refits it (engine.prepare_verdict):
the fit belongs to the weights of one iteration, a TARGET_FPR given on the command line is
applied or refused, and an uncalibrated checkpoint without calibration data says how to go on."""
import logging

import pytest
import torch
from detectron2.data import DatasetCatalog

from ddl_mask2former.data.ddl_dataset import register_ddl_split
from ddl_mask2former.data.synthetic import generate_ddl_dataset
from ddl_mask2former.engine import checkpoint_iteration, prepare_verdict, requested_target_fpr
from ddl_mask2former.evaluation.calibration import VerdictCalibrationError
from ddl_mask2former.modeling.verdict import Verdict

from model_helpers import build, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CALIBRATION_SET, ABSENT_SET = "lifecycle_calib", "lifecycle_absent"


@pytest.fixture(scope="module")
def calibration_sets(tmp_path_factory):
    """A readable calibration split (6 small images, real and fake) and one whose folder is gone."""
    root = tmp_path_factory.mktemp("lifecycle")
    generate_ddl_dataset(str(root / "DDL-I"), 6, 0, seed=3, min_size=64, max_size=80, workers=1,
                         difficulty="easy")
    register_ddl_split(CALIBRATION_SET, str(root / "DDL-I" / "train"), cache_dir=None)
    register_ddl_split(ABSENT_SET, str(root / "missing" / "train"), cache_dir=None)
    yield
    for name in (CALIBRATION_SET, ABSENT_SET):
        DatasetCatalog.remove(name)


def _cfg(calibration=(CALIBRATION_SET,), target_fpr=0.05):
    cfg = tiny_cfg()
    cfg.DATASETS.CALIBRATION = tuple(calibration)
    cfg.MODEL.DDL.VERDICT.TARGET_FPR = target_fpr
    cfg.MODEL.DDL.VERDICT.RULE = "map_max"
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 128
    return cfg


def _calibrated(cfg, fitted_at, target_fpr=0.05):
    """A tiny model whose verdict holds a (made-up) fit of the weights of ``fitted_at``."""
    model = build(cfg)
    model.verdict.set_calibration(model.verdict.rule, {"map_max": 2.0}, -1.0, 0.7, target_fpr)
    model.verdict.calibration_iteration.fill_(fitted_at)
    return model


def test_a_fit_of_other_weights_is_refitted_on_the_calibration_data(calibration_sets, caplog):
    cfg = _cfg()
    model = _calibrated(cfg, fitted_at=999)
    with caplog.at_level(logging.INFO):
        reason = prepare_verdict(cfg, model, {"iteration": 1499}, "model_0001499.pth")
    assert "fitted on the weights of iteration 999" in reason and "iteration 1499" in reason
    assert model.verdict.fitted_at_iteration == 1499 and model.verdict.calibrated
    assert model.verdict.threshold != 0.7
    # The same weights and fit: nothing to do.
    assert prepare_verdict(cfg, model, {"iteration": 1499}, "model_0001499.pth") is None


def test_a_fit_of_other_weights_without_calibration_data_is_refused(calibration_sets):
    cfg = _cfg(calibration=())
    model = _calibrated(cfg, fitted_at=999)
    with pytest.raises(VerdictCalibrationError, match="iteration 999.*iteration 1499.*tools/calibrate.py"):
        prepare_verdict(cfg, model, {"iteration": 1499}, "model_0001499.pth")
    # An unknown iteration on either side (older checkpoints) is taken as it is.
    assert prepare_verdict(cfg, model, {}, "model.pth") is None
    model.verdict.calibration_iteration.fill_(-1)
    assert prepare_verdict(cfg, model, {"iteration": 1499}, "model.pth") is None


def test_a_target_fpr_on_the_command_line_is_applied_or_refused(calibration_sets):
    assert requested_target_fpr(["MODEL.WEIGHTS", "w.pth", "MODEL.DDL.VERDICT.TARGET_FPR", "0.2"]) == 0.2
    assert requested_target_fpr(["MODEL.WEIGHTS", "w.pth"]) is None
    cfg = _cfg(target_fpr=0.2)
    model = _calibrated(cfg, fitted_at=5, target_fpr=0.05)
    # The config file's own rate is no request: the checkpoint keeps its fit.
    assert prepare_verdict(cfg, model, {"iteration": 5}, "w.pth") is None
    assert model.verdict.target_fpr == 0.05
    reason = prepare_verdict(cfg, model, {"iteration": 5}, "w.pth", requested_target_fpr=0.2)
    assert "calibrated at a false-positive rate of 0.05" in reason
    assert model.verdict.target_fpr == 0.2 and model.verdict.fitted_at_iteration == 5
    refused = _calibrated(_cfg(calibration=()), fitted_at=5, target_fpr=0.05)
    with pytest.raises(VerdictCalibrationError, match="leave out the TARGET_FPR override .* rate 0.05"):
        prepare_verdict(_cfg(calibration=(), target_fpr=0.2), refused, {"iteration": 5}, "w.pth",
                        requested_target_fpr=0.2)


def test_an_uncalibrated_checkpoint_without_its_calibration_data_says_how_to_go_on(calibration_sets, caplog):
    cfg = _cfg(calibration=(ABSENT_SET,))
    model = build(cfg)
    with pytest.raises(VerdictCalibrationError) as error:
        prepare_verdict(cfg, model, {"iteration": 9}, "model_final.pth")
    message = str(error.value)
    assert "model_final.pth holds no verdict calibration (uncalibrated checkpoint)" in message
    assert ABSENT_SET in message and "does not exist" in message
    assert "tools/calibrate.py" in message and 'DATASETS.CALIBRATION "()"' in message
    # The second way forward: no calibration data named, the uncalibrated verdict with a warning.
    with caplog.at_level(logging.WARNING):
        assert prepare_verdict(_cfg(calibration=()), model, {"iteration": 9}, "model_final.pth") is None
    assert "running with the uncalibrated 'map_max' verdict" in caplog.text
    assert not model.verdict.calibrated


def test_calibration_records_the_iteration_and_old_checkpoints_load_as_unknown():
    verdict = Verdict("map_max")
    assert verdict.fitted_at_iteration is None and verdict.describe()["calibration_iteration"] is None
    verdict.calibration_iteration.fill_(1499)
    state = verdict.state_dict()
    assert int(state["calibration_iteration"]) == 1499
    # A checkpoint from before the buffer existed (version 1) loads strictly, as "unknown".
    old = verdict.state_dict()
    del old["calibration_iteration"]
    old._metadata[""]["version"] = 1
    fresh = Verdict("map_max")
    fresh.calibration_iteration.fill_(7)
    fresh.load_state_dict(old, strict=True)
    assert fresh.fitted_at_iteration is None
    assert checkpoint_iteration({"iteration": 1499}) == 1499
    assert checkpoint_iteration({"trainer": {"iteration": 20}}) == 20 and checkpoint_iteration({}) is None
