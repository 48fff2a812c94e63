#!/usr/bin/env python
"""Measure the verdict rules of one trained model against each other (docs/EVALUATION.md "Verdict").

    python tools/compare_verdicts.py --config-file CFG --calibration ddl_i_train_calib \
        --eval ddl_i_val [--target-fpr 0.05] [--json OUT.json] MODEL.WEIGHTS model_final.pth

Runs the model once over the calibration datasets and once over the evaluation datasets (raw
outputs: the head's probability and the forgery map), fits every rule of
``MODEL.DDL.VERDICT.RULE`` on the calibration images (logistic regression, threshold at the
target false-positive rate on their real images), and scores each rule on the evaluation
images under both mask policies: AUC, per-image F1 and IoU, the DDL score, real images with
more than 1 % of their pixels marked, real images called fake, fakes called real, and fakes
whose raw mask has IoU >= 0.5 but are called real. Trailing ``KEY VALUE`` pairs override the
config (as in train_net.py). Prints a table and, with --json, writes every number.
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

from ddl_mask2former.config import load_config
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
    parser.add_argument("--target-fpr", type=float, default=None,
                        help="false-positive rate the thresholds are set at (default: the config's "
                             "MODEL.DDL.VERDICT.TARGET_FPR)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--json", default=None, metavar="FILE", help="write every number here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


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
    target_fpr = cfg.MODEL.DDL.VERDICT.TARGET_FPR if args.target_fpr is None else args.target_fpr
    model = Trainer.build_model(cfg)
    try:
        TrainedModelCheckpointer(model, backbone_name=cfg.MODEL.BACKBONE.NAME).load(cfg.MODEL.WEIGHTS)
    except CheckpointMismatchError as exc:
        raise SystemExit(f"compare_verdicts.py: {exc}") from None
    model.eval()
    calibration = records_of(cfg, model, args.calibration)
    evaluation = records_of(cfg, model, args.eval)
    results, rows = {}, []
    for rule in args.rules:
        fit = fit_rule(calibration, rule, target_fpr)
        for policy in MASK_POLICIES:
            metrics = rule_metrics(evaluation, fit, policy)
            results[f"{rule}/{policy}"] = dict(metrics, coefficients=fit.coefficients,
                                                intercept=fit.intercept, calibration_fpr=fit.fpr,
                                                calibration_tpr=fit.tpr)
            rows.append([rule, policy] + [f"{100 * metrics[key]:.2f}" for key, _ in COLUMNS]
                        + [metrics["good_fake_called_real"], f"{fit.threshold:.4f}"])
    headers = ["rule", "mask policy"] + [name for _, name in COLUMNS] + ["fakes IoU>=0.5 called real",
                                                                          "threshold"]
    num_real = sum(r.label == 0 for r in evaluation)
    print(f"Verdict rules fitted on {', '.join(args.calibration)} ({len(calibration)} images), scored on "
          f"{', '.join(args.eval)} ({len(evaluation)} images, {num_real} real); thresholds at "
          f"{100 * target_fpr:.1f} % false positives on the calibration reals; percent:")
    print(tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True, stralign="right"))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"calibration": args.calibration, "eval": args.eval, "target_fpr": target_fpr,
                       "weights": cfg.MODEL.WEIGHTS, "rules": results}, f, indent=2)
        print(f"wrote {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()
