#!/usr/bin/env python
"""Score an exported submission against a labeled split folder in DDL layout.

    python tools/evaluate_predictions.py --pred EXPORT_DIR --gt SPLIT_DIR [--json OUT]

EXPORT_DIR holds prediction.txt ("image_name.png,score" lines) and/or mask/ (0/255 PNGs at the
original size), as DDLEvaluator (TEST.EXPORT_DIR) or tools/ensemble.py write them. SPLIT_DIR
holds real/, fake/ and masks/ (or mask/). Prints the metric table in percent; --json writes
auc, f1, iou, score, f1_pixel, iou_pixel (fractions in [0, 1]; f1/iou are per-image means,
*_pixel from summed pixel counts; null when the task was not scored), num_real, num_fake and
the other computed entries. --conventions adds other papers' figures on the same predictions
(pooled-pixel F1 and two-class mIoU, best-threshold F1 from prob/, TruFor's max(F1, inverted
F1), detection TPR at 1 % and 5 % FPR; docs/EVALUATION.md "Other conventions"). A missing, extra, wrong-size or malformed prediction is an error
naming the image; --allow-missing scores missing ones as 0 / empty and reports how many.

--by KEY [KEY ...] adds, after the overall table, one table per KEY with the metrics of each
group of images (#real, #fake, AUC, per-image F1 and IoU, real images >1 % marked), with values
read from the split's manifest (--manifest; default: manifest_<split folder name>.jsonl in
SPLIT_DIR's parent, as datasets/make_synthetic_ddl.py writes it): family, shape, chain
(post.chain), generator, source. Groups follow the rule TEST.EVAL_GROUP_KEY follows too
(docs/EVALUATION.md "Per group"); images the manifest does not list have no value. A manifest
entry for a file not in the split, or with another label, is an error. --json then adds
"by": {key: {group: {metrics}}}.
"""
import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import textwrap
import time

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")

from ddl_mask2former.evaluation.breakdown import (BREAKDOWN_KEYS, NO_GROUP, check_manifest,
                                                  compute_breakdown, default_manifest_path,
                                                  format_breakdown, read_manifest)
from ddl_mask2former.evaluation.conventions import format_conventions
from ddl_mask2former.evaluation.metrics import GROUP_RULE, format_metrics_table
from ddl_mask2former.evaluation.scoring import (JSON_KEYS, default_num_workers, list_ddl_split,
                                                score_images)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, help="export directory to score")
    parser.add_argument("--gt", required=True, help="split folder with real/, fake/, masks/")
    parser.add_argument("--json", help="write the metrics (fractions) to this JSON file")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score images without a prediction as score 0 / empty mask "
                             "instead of failing")
    parser.add_argument("--mask-threshold", type=int, default=127,
                        help="ground-truth mask pixels above this 8-bit value are forged")
    parser.add_argument("--workers", type=int, default=default_num_workers(),
                        help="decoding threads (default: number of CPUs, at most 8)")
    parser.add_argument("--conventions", action="store_true",
                        help="also report other papers' metric conventions (pooled-pixel F1 and "
                             "two-class mIoU, best-threshold and inverted-max F1, TPR at 1 %% "
                             "and 5 %% FPR); the best-threshold F1 reads prob/")
    parser.add_argument("--by", nargs="+", choices=BREAKDOWN_KEYS, metavar="KEY",
                        help="also one table per KEY with the metrics of each group of images, "
                             f"from the manifest; KEY in {', '.join(BREAKDOWN_KEYS)}")
    parser.add_argument("--manifest",
                        help="manifest for --by (default: manifest_<split folder name>.jsonl "
                             "beside SPLIT_DIR)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.manifest and not args.by:
        parser.error("--manifest is only read with --by")
    args.by = list(dict.fromkeys(args.by or ()))  # each key once, in the order given
    return args


def _json_safe(value):
    """NaN -> null, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv=None):
    # Warnings from the library (e.g. scores outside [0, 1]) as one stderr line each.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        images = list_ddl_split(args.gt)
        manifest, manifest_path, unlisted = None, None, []
        if args.by:  # read and checked before the long scoring pass
            manifest_path = args.manifest or default_manifest_path(args.gt)
            manifest = read_manifest(manifest_path)
            unlisted = check_manifest(manifest, images.names, images.labels, manifest_path,
                                      args.gt)
        scores = score_images(args.pred, images, allow_missing=args.allow_missing,
                              gt_mask_threshold=args.mask_threshold, num_workers=args.workers,
                              progress=not args.no_progress, conventions=args.conventions)
        metrics = scores.results()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    conventions = metrics.pop("conventions", None)
    print(format_metrics_table(metrics))
    if conventions is not None:
        print("other conventions (percent; docs/EVALUATION.md):\n" + format_conventions(conventions))
    breakdown = compute_breakdown(scores, manifest, args.by) if args.by else None
    if args.by:
        print("\n" + textwrap.fill(
            f"per group of {manifest_path}: {GROUP_RULE}; {NO_GROUP} also holds the images the "
            "manifest does not list; '-' marks a figure the group cannot define", width=100,
            break_on_hyphens=False))
        if unlisted:
            print(f"warning: {len(unlisted)} images of {args.gt} are not in the manifest (e.g. "
                  f"{', '.join(unlisted[:5])}); grouped as {NO_GROUP}")
    for key in args.by:
        print("\n" + format_breakdown(key, breakdown[key]))
    print(f"scored {metrics['num_real'] + metrics['num_fake']} images of {args.gt} in "
          f"{elapsed:.1f} s")
    for what in ("scores", "masks"):
        count = metrics[f"num_missing_{what}"]
        if count:
            print(f"warning: {count} images had no prediction ({what}); scored as "
                  f"{'0' if what == 'scores' else 'empty'}")
    if args.json:
        payload = {key: None for key in JSON_KEYS}
        payload.update(_json_safe(metrics))
        if conventions is not None:
            payload["conventions"] = _json_safe(conventions)
        if breakdown is not None:
            payload["by"] = _json_safe(breakdown)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"metrics written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
