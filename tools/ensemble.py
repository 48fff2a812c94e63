#!/usr/bin/env python
"""Fuse several models' exports into one (paper §3.5, eq. 6), and optionally tune the weights.

    python tools/ensemble.py --inputs SWIN_T_DIR SWIN_S_DIR --det-weights 1 2.5 \\
        --loc-weights 1 0 --out ENSEMBLE_DIR [--gt SPLIT_DIR] [--zip]
    python tools/ensemble.py --inputs A_VAL B_VAL --search VAL_SPLIT_DIR [--search-step 0.1]

Detection fuses the prediction.txt scores, localization the prob/ maps (8-bit, written by
TEST.EXPORT_PROB), each as Y = sum(w_i * y_i) / sum(w_i) with its own weights; the output is a
new export (prediction.txt, mask/, prob/). Leaving out --det-weights or --loc-weights skips
that task. --gt scores the result; --search grid-searches each task's weights on a labeled
split (the inputs must be exports of that split) and prints the best weights and scores.
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

from ddl_mask2former.evaluation.export import write_submission_zip
from ddl_mask2former.evaluation.fusion import fuse_exports, search_weights
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
    return args


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
            count = fuse_exports(args.inputs, args.out, det_weights=args.det_weights,
                                 loc_weights=args.loc_weights, num_workers=args.workers,
                                 progress=not args.no_progress)
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
