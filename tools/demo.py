#!/usr/bin/env python
"""Run a trained DDL-Mask2Former on images and draw what it sees.

    python tools/demo.py --config-file cfg.yaml --input photo.jpg 'shots/*.png' folder/ \
        --output demo_out --opts MODEL.WEIGHTS output/model_final.pth MODEL.DEVICE cpu
    python tools/demo.py --exported model.onnx --input photo.jpg --output demo_out

For each readable image it writes ``OUTPUT/<name>_overlay.png`` (heat map of ``mask_prob``,
outline of the predicted ``mask``, caption "FAKE 0.97" / "REAL 0.03" at the
calibrated verdict threshold) and prints one JSON
line on stdout: ``{"file", "fake_prob", "is_fake", "forged_area_fraction", "output"}`` (the same lines
go to ``OUTPUT/predictions.jsonl``). The model runs through ``ddl_mask2former.ForgeryPredictor``
(images resized to the config's test scale, or with ``--opts TEST.TILE.ENABLED True`` predicted
tile by tile at native resolution, and ``TEST.AUG.ENABLED True`` for flip test-time
augmentation; outputs at the original size), or with ``--exported FILE`` through
``ForgeryPredictor.from_exported`` (a file of tools/export_model.py: ONNX Runtime or a
torch.export program, its settings from FILE.json, no config), and the pictures
come from ``ddl_mask2former.visualization``; this script only finds inputs and writes files.
Progress and problems go to stderr; inputs that cannot be read are named there and skipped,
and the exit code is 1 if any input failed, 2 for a bad command line.
"""
import argparse
import glob
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")
# The package first: it hides detectron2's import-time torch.jit deprecation warning.
from ddl_mask2former import ForgeryPredictor

import cv2
import numpy as np
import torch

from ddl_mask2former.config import load_config
from ddl_mask2former.data import DDLDataError
from ddl_mask2former.engine import CheckpointMismatchError
from ddl_mask2former.predictor import load_image
from ddl_mask2former.visualization import forged_area_fraction, render_forgery_overlay

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

logger = logging.getLogger("ddl_mask2former.demo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--config-file", metavar="FILE", help="model config")
    model.add_argument("--exported", metavar="FILE",
                       help="an exported model (.onnx or .pt2 from tools/export_model.py) instead of a config")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, glob patterns (quote them) or folders (searched "
                             "recursively for " + " ".join(IMAGE_EXTENSIONS) + ")")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the overlays")
    parser.add_argument("--alpha", type=float, default=0.6,
                        help="heat-map opacity where mask_prob is 1 (default 0.6)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error("--alpha must be in [0, 1]")
    if args.exported and args.opts:
        parser.error("--opts applies to --config-file; an exported model's settings are in its JSON")
    return args


def collect_inputs(specs):
    """Expand files, globs and folders into a sorted, de-duplicated list of image paths.

    Returns (paths, problems): problems name each input that matched nothing.
    """
    paths, problems = [], []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                str(p) for p in Path(spec).rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                problems.append((spec, "folder holds no image files (" + ", ".join(IMAGE_EXTENSIONS) + ")"))
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                problems.append((spec, "pattern matches no file"))
        else:
            # A named file is always tried, whatever its extension; reading it will tell.
            found = [spec]
        paths.extend(found)
    unique, seen = [], set()
    for path in paths:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, problems


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts, freeze=False)
    if torch.device(cfg.MODEL.DEVICE).type == "cuda" and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no CUDA device is visible: running on the CPU",
                       cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def _overlay_path(output_dir, path, used):
    stem = Path(path).stem or "image"
    name, suffix = f"{stem}_overlay.png", 1
    # Same file name in two input folders: keep both pictures.
    while name in used:
        name = f"{stem}_{suffix}_overlay.png"
        suffix += 1
    used.add(name)
    return os.path.join(output_dir, name)


def run(args):
    paths, failures = collect_inputs(args.input)
    for spec, problem in failures:
        logger.error("%s: %s", spec, problem)
    if not paths:
        logger.error("no input images to process")
        return 1

    if args.exported:
        try:
            predictor = ForgeryPredictor.from_exported(args.exported)
        except (OSError, ValueError, ImportError) as exc:
            logger.error("%s", exc)
            return 1
    else:
        predictor = ForgeryPredictor(setup_cfg(args))
    os.makedirs(args.output, exist_ok=True)
    jsonl_path = os.path.join(args.output, "predictions.jsonl")
    used_names, done = set(), 0
    start = time.perf_counter()
    with open(jsonl_path, "w") as jsonl:
        for index, path in enumerate(paths, 1):
            tick = time.perf_counter()
            try:
                image = load_image(path)
                prediction = predictor(image)
            except (DDLDataError, OSError) as exc:
                # The reader's message already starts with the file name.
                message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                logger.error("[%d/%d] skipped %s", index, len(paths), message)
                failures.append((path, str(exc)))
                continue
            mask = prediction.get("mask")
            overlay = render_forgery_overlay(
                image, prediction.get("mask_prob"), mask, prediction.get("fake_prob"),
                alpha=args.alpha, threshold=predictor.threshold,
            )
            out_path = _overlay_path(args.output, path, used_names)
            if not cv2.imwrite(out_path, np.ascontiguousarray(overlay[:, :, ::-1])):
                logger.error("[%d/%d] %s: cannot write %s", index, len(paths), path, out_path)
                failures.append((path, f"cannot write {out_path}"))
                continue
            line = json.dumps({
                "file": path,
                "fake_prob": prediction.get("fake_prob"),
                "is_fake": prediction.get("is_fake"),
                "forged_area_fraction": None if mask is None else forged_area_fraction(mask),
                "output": out_path,
            })
            print(line, flush=True)
            jsonl.write(line + "\n")
            done += 1
            logger.info("[%d/%d] %s -> %s (%.2f s)", index, len(paths), path, out_path,
                        time.perf_counter() - tick)
    elapsed = time.perf_counter() - start
    logger.info("%d of %d images done in %.1f s; overlays and predictions.jsonl in %s",
                done, len(paths), elapsed, os.path.abspath(args.output))
    if failures:
        logger.error("%d input(s) failed: %s", len(failures), ", ".join(str(f[0]) for f in failures))
        return 1
    return 0


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        return run(args)
    except FileNotFoundError as exc:
        logger.error("%s", exc)
        return 1
    except CheckpointMismatchError as exc:
        raise SystemExit(f"demo.py: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
