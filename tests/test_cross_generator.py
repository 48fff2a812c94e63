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
from tool_helpers import load_script, load_tool

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
    mixed = quickstart.parse_args(["--generator", "mixed", "--families", "splice", "--chains", "jpeg"])
    assert mixed.varied_share == 0.5 and mixed.families == ["splice"] and mixed.chains == ["jpeg"]
    for bad in (["--generator", "mixed", "--varied-share", "2"], ["--generator", "varied", "--varied-share", "0.5"]):
        with pytest.raises(SystemExit):
            quickstart.parse_args(bad)


def test_quickstart_reuses_mixed_data_only_at_the_same_share(tmp_path):
    quickstart = load_tool("quickstart")
    made = []

    class Steps:  # records the data step instead of running it
        out_dir = tmp_path

        def run(self, name, cmd, show):
            made.append(cmd)
            (tmp_path / "data" / "DDL-I").mkdir(parents=True, exist_ok=True)

    for share, runs in (("0.5", 1), ("0.5", 1), ("0.25", 2)):
        quickstart.generate_data(Steps(), quickstart.parse_args(["--generator", "mixed", "--varied-share", share]))
        assert len(made) == runs
    assert made[-1][made[-1].index("--varied-share") + 1] == 0.25
    # Classic and varied stamps keep the keys they had before the mix.
    quickstart.generate_data(Steps(), quickstart.parse_args([]))
    assert "varied_share" not in json.loads((tmp_path / "data" / "DDL-I" / "quickstart_params.json").read_text())


def test_mixed_recipe_options_and_folders(xgen, tmp_path, capsys):
    fold = xgen.parse_fold("family:copy_move")
    args = xgen.parse_args(["--out", "o", "--recipe", "mix", "--generator", "mixed"])
    assert args.varied_share == 0.5
    quarter = xgen.parse_args(["--out", "o", "--recipe", "mix", "--generator", "mixed", "--varied-share", "0.25"])
    varied = xgen.parse_args(["--out", "o"])
    # Per-fold data, apart from the varied recipe's and from another share's.
    assert xgen.data_root(tmp_path, args, fold) == tmp_path / "data" / "mixed-0.5" / "family-copy_move"
    assert len({xgen.data_root(tmp_path, a, fold) for a in (args, quarter, varied)}) == 3
    assert xgen.trained_dir(tmp_path, args, fold, 0) == tmp_path / "mix" / "family-copy_move" / "seed0"
    for argv, message in ((["--generator", "mixed", "--varied-share", "1.5"], "--varied-share must be in [0, 1]"),
                          (["--varied-share", "0.5"], "--varied-share belongs to the mixed generator")):
        with pytest.raises(SystemExit):
            xgen.parse_args(["--out", "o", *argv])
        assert message in capsys.readouterr().err


def test_mixed_fold_never_trains_on_the_held_out_family_or_chain(xgen, tmp_path, monkeypatch):
    """The quickstart command of a mixed fold, and a small copy of the data it would make."""
    monkeypatch.setenv("DDL_PHOTO_DIR", str(tmp_path / "no-photos"))  # decoding them takes seconds
    commands = []
    monkeypatch.setattr(xgen, "run", lambda cmd, log_path, env=None, echo=False: commands.append(cmd))
    args = xgen.parse_args(["--out", str(tmp_path), "--generator", "mixed", "--varied-share", "0.5",
                            "--folds", "family:copy_move+chain:double_jpeg", "--seeds", "0"])
    xgen.stage_train(tmp_path, args)
    quickstart = load_tool("quickstart")
    train_args = quickstart.parse_args([str(c) for c in commands[0][2:]])
    assert train_args.generator == "mixed" and train_args.varied_share == 0.5
    assert "copy_move" not in train_args.families and "double_jpeg" not in train_args.chains
    # The same data at a small size.
    train_args.num_train, train_args.num_val, train_args.image_size = 40, 0, (48, 80)
    cli = load_script(REPO / "datasets" / "make_synthetic_ddl.py")
    cli.main([str(a) for a in quickstart.synthetic_data_args(train_args, tmp_path / "DDL-I")] + ["--workers", "1"])
    records = [json.loads(line) for line in open(tmp_path / "DDL-I" / "manifest_train.jsonl")]
    assert {r["generator"] for r in records} == {"classic", "varied"}
    for record in records:
        assert "copy_move" not in record.get("families", []) and record.get("post", {}).get("chain") != "double_jpeg"
