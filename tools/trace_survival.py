#!/usr/bin/env python
"""How much of the forgery's noise trace survives a perturbation, with no model involved.

    python tools/trace_survival.py --split DIR [--levels jpeg:90,70 resize:0.5] \
        [--max-images 60] [--json OUT.json]

Many forgeries (a spliced face, an inpainted or resampled region) change the local noise: the
region is smoother or grainier than the photograph around it, and this is what a detector
trained from scratch learns first. For each fake image of the labeled split DIR (DDL layout),
this tool measures that evidence directly: a high-pass noise residual of the gray image (the
second-order SRM kernel [[-1, 2, -1], [2, -4, 2], [-1, 2, -1]] / 4), its local log-energy
(log of the residual's squared mean over a 9 x 9 window), and the pixel AUC with which that
energy tells forged pixels from authentic ones, folded to max(AUC, 1 - AUC) since a region may
be smoother or grainier (0.5: no evidence; 1: every forged pixel stands apart). 4,000 pixels of
each class per image, drawn with a fixed seed. It does so on the clean images and after each
perturbation of ``tools/robustness.py`` (same definitions, ``data/perturbations.py``;
masks follow resizing by ``resize_mask``) and prints, per condition, the mean separability
over images and the share of the clean margin above chance that is left,
(separability - 0.5) / (clean separability - 0.5).

It bounds what any model that reads local noise can do: where the evidence is gone, training
cannot bring it back.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import time
from collections import OrderedDict

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")

import cv2
import numpy as np

from ddl_mask2former.data.ddl_dataset import load_ddl_split
from ddl_mask2former.data.image_io import DDLDataError, read_forgery_mask, read_image
from ddl_mask2former.evaluation.metrics import roc_auc
from ddl_mask2former.data.perturbations import (
    SWEEPS, level_key, parse_level, perturb, perturb_mask)

TOOL = "trace_survival.py"
CLEAN = "clean"
# second-order SRM high-pass kernel (a 3x3 Laplacian-like noise residual)
SRM_KERNEL = np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], np.float32) / 4
ENERGY_WINDOW = 9
PIXELS_PER_CLASS = 4000
DEFAULT_LEVELS = ("jpeg:90,70", "resize:0.5")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", required=True, help="labeled split folder in DDL layout")
    parser.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS), metavar="KIND:LEVEL[,LEVEL...]",
                        help=f"perturbations to measure (default: {' '.join(DEFAULT_LEVELS)}; "
                             "same names as tools/robustness.py --levels)")
    parser.add_argument("--max-images", type=int, default=60,
                        help="fake images measured, the first by name (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pixel sample and the noise")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    args.conditions = [(CLEAN, None)]
    for text in args.levels:
        kind, _, levels = text.partition(":")
        if kind not in SWEEPS or not levels:
            parser.error(f"--levels {text!r}: expected KIND:LEVEL[,LEVEL...] with KIND one of "
                         f"{', '.join(SWEEPS)}")
        try:
            args.conditions += [(kind, parse_level(kind, level)) for level in levels.split(",")]
        except ValueError as exc:
            parser.error(f"--levels {text!r}: {exc}")
    return args


def noise_energy(image_rgb):
    """Local log-energy of the high-pass noise residual of an RGB uint8 image (float32 HxW)."""
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    residual = cv2.filter2D(gray, -1, SRM_KERNEL, borderType=cv2.BORDER_REFLECT_101)
    energy = cv2.blur(residual * residual, (ENERGY_WINDOW, ENERGY_WINDOW),
                      borderType=cv2.BORDER_REFLECT_101)
    return np.log(energy + 1e-3)


def separability(energy, forged, rng):
    """max(AUC, 1 - AUC) of ``energy`` for forged against authentic pixels; None when a class
    is absent."""
    forged_values, authentic_values = energy[forged], energy[~forged]
    if forged_values.size == 0 or authentic_values.size == 0:
        return None
    forged_values = rng.choice(forged_values, min(PIXELS_PER_CLASS, forged_values.size), replace=False)
    authentic_values = rng.choice(authentic_values, min(PIXELS_PER_CLASS, authentic_values.size),
                                  replace=False)
    labels = np.concatenate([np.ones(forged_values.size, np.int8), np.zeros(authentic_values.size, np.int8)])
    auc = roc_auc(labels, np.concatenate([forged_values, authentic_values]))
    return max(auc, 1.0 - auc)


def measure(fakes, conditions, seed, mask_threshold=127):
    """{condition label: [separability per image]} over the fake images' dataset dicts."""
    results = OrderedDict((CLEAN if kind == CLEAN else f"{kind} {level_key(level)}", [])
                          for kind, level in conditions)
    start = time.monotonic()
    for number, record in enumerate(fakes, start=1):
        try:
            image = read_image(record["file_name"])
            forged = read_forgery_mask(record["mask_file"], threshold=mask_threshold)
        except DDLDataError as exc:
            raise SystemExit(f"{TOOL}: {exc}")
        for (kind, level), label in zip(conditions, results):
            rng = np.random.default_rng([seed, number])
            if kind == CLEAN:
                perturbed, mask = image, forged
            else:
                perturbed = perturb(image, kind, level, rng)
                mask = perturb_mask(forged, kind, level, perturbed.shape[:2])
            results[label].append(separability(noise_energy(perturbed), mask, rng))
        if number % 10 == 0 or number == len(fakes):
            elapsed = time.monotonic() - start
            print(f"  {number}/{len(fakes)} images ({elapsed:.0f} s, ETA "
                  f"{elapsed / number * (len(fakes) - number):.0f} s)", file=sys.stderr, flush=True)
    return results


def summarize(results):
    clean = np.array([np.nan if v is None else v for v in results[CLEAN]])
    summary = OrderedDict()
    for label, values in results.items():
        values = np.array([np.nan if v is None else v for v in values])
        valid = ~np.isnan(values) & ~np.isnan(clean)
        mean = float(np.mean(values[valid])) if valid.any() else float("nan")
        clean_mean = float(np.mean(clean[valid])) if valid.any() else float("nan")
        summary[label] = {"separability": mean, "images": int(valid.sum()),
                          "margin_kept": (mean - 0.5) / (clean_mean - 0.5)
                          if clean_mean > 0.5 else float("nan")}
    return summary


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.split):
        raise SystemExit(f"{TOOL}: --split {args.split}: not a folder")
    try:
        dicts = load_ddl_split(args.split)
    except (DDLDataError, ValueError, OSError) as exc:
        raise SystemExit(f"{TOOL}: {exc}")
    fakes = sorted((d for d in dicts if d.get("label") == 1), key=lambda d: d["file_name"])
    if not fakes:
        raise SystemExit(f"{TOOL}: {args.split}: no labeled fake images (fake/ and masks/)")
    fakes = fakes[:args.max_images]
    print(f"{len(fakes)} fake images of {os.path.abspath(args.split)}, {len(args.conditions)} conditions",
          flush=True)
    summary = summarize(measure(fakes, args.conditions, args.seed))
    print("| condition | noise-trace separability | clean margin kept |\n|---|---:|---:|")
    for label, entry in summary.items():
        kept = "" if label == CLEAN else f"{100 * entry['margin_kept']:.0f} %"
        print(f"| {label} | {entry['separability']:.3f} | {kept} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({key: {k: (None if isinstance(v, float) and math.isnan(v) else v)
                             for k, v in entry.items()} for key, entry in summary.items()},
                      handle, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
