#!/usr/bin/env python
"""Measure the verdict rules of one trained model against each other (docs/EVALUATION.md "Verdict").

    python tools/compare_verdicts.py --config-file CFG --calibration ddl_i_train_calib \
        --eval ddl_i_val [--target-fpr 0.05 0.1] [--json OUT.json] MODEL.WEIGHTS model_final.pth

Runs the model once over the calibration datasets and once over the evaluation datasets (raw
outputs: the head's probability and the forgery map), fits every rule of
``MODEL.DDL.VERDICT.RULE`` on the calibration images (logistic regression, threshold at each
target false-positive rate on their real images), and scores each rule on the evaluation
images under both mask policies: AUC, per-image F1 and IoU, the DDL score, real images with
more than 1 % of their pixels marked, real images called fake, fakes called real, and fakes
whose raw mask has IoU >= 0.5 but are called real. Trailing ``KEY VALUE`` pairs override the
config (as in train_net.py); they may follow the dataset lists directly (a config key is never a
dataset name). Prints a table and, with --json, writes every number.
"""
import argparse
import importlib.util
import json
import os
import sys

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")
import ddl_mask2former  # noqa: F401  (registers datasets and the model)

import torch
from tabulate import tabulate

from ddl_mask2former.config import load_config, split_config_overrides
from ddl_mask2former.engine import CheckpointMismatchError, Trainer, TrainedModelCheckpointer
from ddl_mask2former.evaluation.calibration import collect_records, fit_rule, rule_metrics
from ddl_mask2former.modeling.verdict import MASK_POLICIES, RULES

COLUMNS = (("auc", "AUC"), ("f1", "F1"), ("iou", "IoU"), ("score", "score"),
           ("real_false_alarm", "real >1% marked"), ("real_called_fake", "real called fake"),
           ("fake_called_real", "fake called real"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--calibration", nargs="+", required=True, metavar="DATASET",
                        help="registered datasets to fit the rules on (e.g. ddl_i_train_calib)")
    parser.add_argument("--eval", nargs="+", required=True, metavar="DATASET",
                        help="registered datasets to score the rules on (e.g. ddl_i_val)")
    parser.add_argument("--target-fpr", type=float, nargs="+", default=None, metavar="FPR",
                        help="false-positive rates the thresholds are set at, each in [0, 1), all from "
                             "one run of the model (default: the config's MODEL.DDL.VERDICT.TARGET_FPR)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--json", default=None, metavar="FILE", help="write every number here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    # "--eval ddl_i_val MODEL.WEIGHTS w": the overrides end the dataset lists.
    options, overrides = split_config_overrides(argv)
    args = parser.parse_args(options)
    args.opts = list(args.opts) + overrides
    for target in args.target_fpr or ():
        if not 0.0 <= target < 1.0:
            parser.error(f"--target-fpr {target}: a false-positive rate in [0, 1)")
    return args


def setup(args):
    try:
        cfg = load_config(args.config_file, args.opts)
    except FileNotFoundError as exc:
        raise SystemExit(f"compare_verdicts.py: {exc}") from None
    if not cfg.MODEL.WEIGHTS or not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise SystemExit(f"compare_verdicts.py: MODEL.WEIGHTS must name a checkpoint file, got "
                         f"{cfg.MODEL.WEIGHTS!r}")
    return cfg


def records_of(cfg, model, dataset_names):
    records = []
    for name in dataset_names:
        records += collect_records(model, Trainer.build_test_loader(cfg, name), cfg.INPUT.MASK_THRESHOLD)
    return records


def main(argv=None):
    args = parse_args(argv)
    cfg = setup(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [cfg.MODEL.DDL.VERDICT.TARGET_FPR] if args.target_fpr is None else args.target_fpr
    model = Trainer.build_model(cfg)
    try:
        TrainedModelCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    except CheckpointMismatchError as exc:
        raise SystemExit(f"compare_verdicts.py: {exc}") from None
    model.eval()
    calibration = records_of(cfg, model, args.calibration)
    evaluation = records_of(cfg, model, args.eval)
    results, rows = {}, []
    for target_fpr in targets:
        for rule in args.rules:
            fit = fit_rule(calibration, rule, target_fpr)
            for policy in MASK_POLICIES:
                metrics = rule_metrics(evaluation, fit, policy)
                results[result_key(rule, policy, target_fpr, len(targets))] = dict(
                    metrics, target_fpr=target_fpr, coefficients=fit.coefficients, intercept=fit.intercept,
                    threshold=fit.threshold, calibration_fpr=fit.fpr, calibration_tpr=fit.tpr)
                rows.append([f"{100 * target_fpr:g}", rule, policy]
                            + [f"{100 * metrics[key]:.2f}" for key, _ in COLUMNS]
                            + [metrics["good_fake_called_real"], f"{fit.threshold:.4f}"])
    headers = ["target FPR", "rule", "mask policy"] + [name for _, name in COLUMNS] + [
        "fakes IoU>=0.5 called real", "threshold"]
    num_real = sum(r.label == 0 for r in evaluation)
    print(f"Verdict rules fitted on {', '.join(args.calibration)} ({len(calibration)} images), scored on "
          f"{', '.join(args.eval)} ({len(evaluation)} images, {num_real} real); thresholds at the target "
          f"false-positive rate on the calibration reals; percent:")
    print(tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True, stralign="right"))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"calibration": args.calibration, "eval": args.eval,
                       "target_fpr": targets[0] if len(targets) == 1 else targets,
                       "weights": cfg.MODEL.WEIGHTS, "rules": results}, f, indent=2)
        print(f"wrote {os.path.abspath(args.json)}")


def result_key(rule, policy, target_fpr, num_targets):
    """JSON key of one result: "rule/policy", with "@target" when several targets were fitted."""
    return f"{rule}/{policy}" + (f"@{target_fpr:g}" if num_targets > 1 else "")

if __name__ == "__main__":
    main()
