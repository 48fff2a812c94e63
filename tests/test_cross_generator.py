"""tools/cross_generator.py (the held-out-family protocol): folds, evaluation sets, the report on
hand-written evaluations, and tools/robustness.py --clean-only on a tiny random-weight model."""
import json
from pathlib import Path

import pytest
import torch

import ddl_mask2former  # noqa: F401  (registers the model)
from ddl_mask2former.config import load_config
from ddl_mask2former.data.synthetic import generate_ddl_dataset
from ddl_mask2former.data.synthetic_varied import FORGERY_FAMILIES, POST_CHAINS
from ddl_mask2former.engine import Trainer
from tool_helpers import load_tool

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def xgen():
    return load_tool("cross_generator")


def test_folds_hold_out_what_they_name(xgen):
    fold = xgen.parse_fold("family:copy_move+chain:double_jpeg")
    assert fold == {"family": "copy_move", "chain": "double_jpeg"}
    assert xgen.fold_name(fold) == "family-copy_move+chain-double_jpeg"
    train = xgen.training_variety(fold)
    families = train[1:train.index("--chains")]
    chains = train[train.index("--chains") + 1:]
    assert "copy_move" not in families and len(families) == len(FORGERY_FAMILIES) - 1
    assert "double_jpeg" not in chains and len(chains) == len(POST_CHAINS) - 1
    sets = xgen.held_out_sets(fold)
    assert sets["held_out_family"] == ["--families", "copy_move", "--chains", *chains]
    assert sets["held_out_chain"] == ["--families", *families, "--chains", "double_jpeg"]
    only_family = xgen.parse_fold("family:inpaint")
    assert list(xgen.held_out_sets(only_family)) == ["held_out_family"]
    assert "--chains" not in xgen.training_variety(only_family)
    for bad in ("family:gan", "chain:jpeg+chain:none", "shape:blob", "copy_move"):
        with pytest.raises(ValueError, match="fold"):
            xgen.parse_fold(bad)


def test_default_folds_are_every_family_then_every_chain(xgen):
    args = xgen.parse_args(["--out", "o"])
    assert [xgen.fold_name(f) for f in args.fold_list] == (
        [f"family-{f}" for f in FORGERY_FAMILIES] + [f"chain-{c}" for c in POST_CHAINS])
    assert args.seeds == [0, 1, 2]
    with pytest.raises(SystemExit):
        xgen.parse_args(["--out", "o", "--recipe", "data"])
    with pytest.raises(SystemExit):
        xgen.parse_args(["--out", "o", "SOLVER.MAX_ITER"])


def _metrics(auc, iou, marked):
    return {"auc": auc, "iou": iou, "f1": iou, "score": auc, "real_false_alarm": marked,
            "num_real": 60, "num_fake": 60}


def _write(root, recipe, fold, seed, set_name, results):
    path = root / recipe / fold / f"seed{seed}" / "eval" / set_name / "robustness.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results))


def test_report_gives_mean_and_worst_seed_and_kept_shares(xgen, tmp_path):
    for seed, (auc, iou) in enumerate([(0.9, 0.5), (0.8, 0.4), (1.0, 0.6)]):
        _write(tmp_path, "varied", "family-splice", seed, "in_domain", {
            "clean": _metrics(auc, iou, 0.05),
            "jpeg": {"70": _metrics(auc / 2, iou / 4, 0.1)},
            "resize": {"0.5": _metrics(auc, iou / 2, 0.1)}})
        _write(tmp_path, "varied", "family-splice", seed, "held_out_family", {
            "clean": _metrics(auc - 0.1, iou - 0.1, 0.02 * (seed + 1))})
        # A second fold, one seed only for the first two seeds.
        if seed < 2:
            _write(tmp_path, "varied", "family-warp", seed, "held_out_family", {
                "clean": _metrics(0.5, 0.1, 0.0)})
    summary = xgen.summarize(xgen.collect(tmp_path))
    splice = summary["varied"]["folds"]["family-splice"]
    assert splice["in-domain AUC"]["mean"] == pytest.approx(0.9)
    assert splice["in-domain AUC"]["worst"] == pytest.approx(0.8)
    assert splice["held-out family real marked"]["worst"] == pytest.approx(0.06)  # worst is the highest
    assert splice["JPEG 70 IoU kept"]["mean"] == pytest.approx(0.25)
    assert splice["resize 0.5 AUC kept"]["worst"] == pytest.approx(1.0)
    assert "held-out chain AUC" not in splice
    # Over folds: per seed the mean of its folds, then mean and worst over seeds.
    overall = summary["varied"]["all"]["held-out family AUC"]
    assert overall["seeds"] == {"0": pytest.approx(0.65), "1": pytest.approx(0.6), "2": pytest.approx(0.9)}
    assert overall["worst"] == pytest.approx(0.6)
    xgen.stage_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "### all folds" in report and "### family-splice" in report
    assert "| varied | 3 | 90.0 (80.0) | 50.0 (40.0) |" in report
    assert json.loads((tmp_path / "report.json").read_text())["varied"]["folds"]["family-warp"]


def test_report_without_evaluations_says_so(xgen, tmp_path):
    with pytest.raises(SystemExit, match="no evaluations under"):
        xgen.stage_report(tmp_path)


def test_evaluate_names_what_is_missing(xgen, tmp_path):
    args = xgen.parse_args(["--out", str(tmp_path), "--folds", "family:blend", "--seeds", "0"])
    with pytest.raises(SystemExit, match="no model at .*seed0/model_main/model_final.pth"):
        xgen.stage_evaluate(tmp_path, args)


@pytest.mark.slow
def test_robustness_clean_only_scores_the_split_as_it_is(tmp_path):
    robustness = load_tool("robustness")
    generate_ddl_dataset(str(tmp_path / "DDL-I"), 0, 4, seed=0, min_size=64, max_size=96, workers=1)
    torch.manual_seed(0)
    weights = tmp_path / "random.pth"
    torch.save({"model": Trainer.build_model(load_config(str(TINY_CONFIG))).state_dict()}, weights)
    out = tmp_path / "out"
    argv = ["--config-file", str(TINY_CONFIG), "--split", str(tmp_path / "DDL-I" / "val"), "--output", str(out)]
    with pytest.raises(SystemExit, match="--clean-only runs no perturbation"):
        robustness.main(argv + ["--clean-only", "--levels", "jpeg:70", "MODEL.WEIGHTS", str(weights)])
    robustness.main(argv + ["--clean-only", "MODEL.WEIGHTS", str(weights)])
    results = json.loads((out / "robustness.json").read_text())
    assert list(results) == ["clean"] and results["clean"]["num_fake"] == 2
    assert not (out / "robustness.png").exists()


def test_quickstart_generator_options():
    quickstart = load_tool("quickstart")
    assert quickstart.parse_args([]).generator == "classic"
    args = quickstart.parse_args(["--generator", "varied", "--families", "splice", "warp", "--chains", "jpeg",
                                  "--data", "d"])
    assert args.generator == "varied" and args.families == ["splice", "warp"] and args.chains == ["jpeg"]
    assert quickstart.data_dir(args, Path("o")) == Path("d").resolve()
    assert quickstart.data_dir(quickstart.parse_args([]), Path("o")) == Path("o") / "data"
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--generator", "classic", "--families", "splice"])
