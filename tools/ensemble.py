#!/usr/bin/env python
"""Fuse several models' exports into one (paper §3.5, eq. 6), and optionally tune the weights.

    python tools/ensemble.py --inputs SWIN_T_DIR SWIN_S_DIR --det-weights 1 2.5 \\
        --loc-weights 1 0 --calibration-inputs SWIN_T_CALIB SWIN_S_CALIB \\
        --calibration-split datasets/DDL-I/train --out ENSEMBLE_DIR [--gt SPLIT_DIR] [--zip]
    python tools/ensemble.py --inputs A_VAL B_VAL --search VAL_SPLIT_DIR [--search-step 0.1]

Each member's evidence before its verdict is fused: detection the head's scores
(head_prediction.txt), localization the ungated maps (prob/, and ungated_prob/ where the
member's gate emptied a map; 8-bit, written by TEST.EXPORT_PROB), each as
Y = sum(w_i * y_i) / sum(w_i) with its own weights; the output is a new export (prediction.txt,
mask/, prob/). Leaving out --det-weights or --loc-weights skips that task. When the members carry
a verdict (verdict.json), the ensemble gets its own, as one model does: fitted by the same
rules on the members' exports of the calibration split (--calibration-inputs, labels from
--calibration-split, the folder that holds those images, e.g. DDL-I/train for
ddl_i_train_calib), then applied to the fused evidence with its threshold and gate, and
described in the output's verdict.json (rule, mask policy and target FPR from the members'
verdict.json unless given). --gt scores the result; --search grid-searches each task's weights
on a labeled split (the inputs must be exports of that split) and prints the best weights and
scores.
"""
import argparse
import importlib.util
import json
import logging
import math
import os
import sys

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")

from ddl_mask2former.evaluation.export import VERDICT_FILE, write_submission_zip
from ddl_mask2former.evaluation.fusion import calibrate_ensemble, fuse_exports, search_weights
from ddl_mask2former.evaluation.metrics import format_metrics_table
from ddl_mask2former.evaluation.scoring import default_num_workers, score_export


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="export directories")
    parser.add_argument("--det-weights", nargs="+", type=float,
                        help="detection weight per input (omit to skip detection)")
    parser.add_argument("--loc-weights", nargs="+", type=float,
                        help="localization weight per input (omit to skip localization)")
    parser.add_argument("--out", help="output export directory")
    parser.add_argument("--zip", action="store_true", help="also write submission.zip in --out")
    parser.add_argument("--gt", help="labeled split folder: score the fused export")
    parser.add_argument("--search", metavar="SPLIT_DIR",
                        help="labeled split folder: grid-search each task's weights")
    parser.add_argument("--search-step", type=float, default=0.1,
                        help="grid step of normalized weights for --search (default 0.1)")
    parser.add_argument("--search-tasks", choices=("det", "loc", "both"), default="both",
                        help="which task's weights --search tunes")
    parser.add_argument("--calibration-inputs", nargs="+", metavar="DIR",
                        help="the members' exports of the calibration split, in --inputs order")
    parser.add_argument("--calibration-split", metavar="SPLIT_DIR",
                        help="labeled folder holding the calibration images (their labels)")
    parser.add_argument("--rule", help="the ensemble verdict's rule (default: the members')")
    parser.add_argument("--mask-policy", help="gate or independent (default: the members')")
    parser.add_argument("--target-fpr", type=float, help="the ensemble verdict's target false-positive "
                        "rate on the calibration reals (default: the members')")
    parser.add_argument("--json", help="write the search results or --gt metrics here")
    parser.add_argument("--mask-threshold", type=int, default=127,
                        help="ground-truth mask pixels above this 8-bit value are forged")
    parser.add_argument("--workers", type=int, default=default_num_workers())
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.search is None and args.out is None:
        parser.error("give --out (fuse) or --search (tune weights), or both")
    if args.gt and not args.out:
        parser.error("--gt scores the fused export: it needs --out")
    if args.out and args.det_weights is None and args.loc_weights is None:
        parser.error("--out needs --det-weights and/or --loc-weights")
    if bool(args.calibration_inputs) != bool(args.calibration_split):
        parser.error("--calibration-inputs and --calibration-split go together")
    if args.calibration_inputs and len(args.calibration_inputs) != len(args.inputs):
        parser.error(f"--calibration-inputs: one export per input ({len(args.inputs)}), got "
                     f"{len(args.calibration_inputs)}")
    if args.target_fpr is not None and not 0.0 <= args.target_fpr < 1.0:
        parser.error(f"--target-fpr must be a rate in [0, 1), got {args.target_fpr}")
    return args


def members_verdict_settings(inputs):
    """(rule, mask policy, target FPR) the members' verdict.json agree on, or None when they
    carry no verdict; ValueError when some do and some do not."""
    described = []
    for export_dir in inputs:
        path = os.path.join(export_dir, VERDICT_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                described.append(json.load(f))
    if not described:
        return None
    if len(described) != len(inputs):
        raise ValueError(f"only {len(described)} of the {len(inputs)} inputs have a {VERDICT_FILE}; "
                         "fuse exports made alike")
    first = described[0]
    return first["rule"], first["mask_policy"], first.get("target_fpr")


def ensemble_verdict(args):
    """The ensemble's own verdict for members that carry one (None for plain exports)."""
    from ddl_mask2former.modeling.verdict import Verdict

    settings = members_verdict_settings(args.inputs)
    if settings is None:
        return None
    rule = args.rule or settings[0]
    mask_policy = args.mask_policy or settings[1]
    target_fpr = args.target_fpr if args.target_fpr is not None else settings[2]
    if not args.calibration_inputs:
        logging.getLogger(__name__).warning(
            "the ensemble's verdict is not calibrated (rule %s, threshold 0.5): give "
            "--calibration-inputs (the members' exports of the calibration split) and "
            "--calibration-split to fit it", rule)
        return Verdict(rule, mask_policy, args.det_weights is not None, args.loc_weights is not None)
    if target_fpr is None:
        raise ValueError("the members' verdicts were not calibrated: give --target-fpr")
    verdict, fits = calibrate_ensemble(args.calibration_inputs, args.calibration_split, target_fpr,
                                       det_weights=args.det_weights, loc_weights=args.loc_weights,
                                       rule=rule, mask_policy=mask_policy)
    for fit in fits:
        print(f"ensemble verdict {fit.rule:<8} threshold {fit.threshold:.4f}  real called fake "
              f"{100 * fit.fpr:5.1f} %  fake called fake {100 * fit.tpr:5.1f} %"
              + ("   <- in use" if fit.rule == rule else ""))
    return verdict


def _dump_json(path, payload):
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return None if isinstance(value, float) and math.isnan(value) else value

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=2)
    print(f"results written to {path}")


def _fmt(weights):
    return " ".join(f"{w:g}" for w in weights)


def run_search(args):
    result = search_weights(args.inputs, args.search, step=args.search_step,
                            search_det=args.search_tasks in ("det", "both"),
                            search_loc=args.search_tasks in ("loc", "both"),
                            gt_mask_threshold=args.mask_threshold, num_workers=args.workers,
                            progress=not args.no_progress)
    for entry in result.get("det", []):
        print(f"det weights {_fmt(entry['weights'])}: AUC {100 * entry['auc']:.2f}")
    for entry in result.get("loc", []):
        print(f"loc weights {_fmt(entry['weights'])}: F1 {100 * entry['f1']:.2f} "
              f"IoU {100 * entry['iou']:.2f}")
    if "best_det_weights" in result:
        print(f"best detection weights: {_fmt(result['best_det_weights'])}")
    if "best_loc_weights" in result:
        print(f"best localization weights: {_fmt(result['best_loc_weights'])}")
    print("best: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in result["best"].items()))
    return result


def main(argv=None):
    # Warnings from the library (e.g. scores outside [0, 1]) as one stderr line each.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    payload = {}
    try:
        if args.search:
            payload["search"] = run_search(args)
        if args.out:
            verdict = ensemble_verdict(args)
            count = fuse_exports(args.inputs, args.out, det_weights=args.det_weights,
                                 loc_weights=args.loc_weights, num_workers=args.workers,
                                 progress=not args.no_progress, verdict=verdict)
            print(f"fused export of {count} images written to {args.out}")
            if args.zip:
                print(f"submission zip written to {write_submission_zip(args.out)}")
            if args.gt:
                metrics = score_export(args.out, args.gt, gt_mask_threshold=args.mask_threshold,
                                       num_workers=args.workers, progress=not args.no_progress)
                print(format_metrics_table(metrics))
                payload["metrics"] = metrics
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _dump_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
