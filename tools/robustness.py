#!/usr/bin/env python
r"""Robustness benchmark: a model's AUC, F1, IoU and false alarms under perturbed images.

    python tools/robustness.py --config-file CFG --split DIR --output OUT \
        [--perturbations jpeg blur noise resize chain] [--levels jpeg:90,70 resize:0.5] \
        [--clean-only] [--convention ours|imdl-benco] [--num-gpus N] [--seed 0] [--keep-images] \
        MODEL.WEIGHTS model_final.pth

Evaluates the model on the labeled split DIR (DDL layout: real/, fake/, masks/ or mask/) as it
is, then on a perturbed copy of it for every level of every perturbation (real and fake images
alike; definitions in ddl_mask2former/data/perturbations.py and docs/EVALUATION.md
"Robustness"). Each copy is written in DDL layout under OUT/images/, registered as a dataset
and scored by Trainer.test, the evaluator's own path, so tiling, flip and verdict are whatever
the config says; the copy is deleted once scored unless --keep-images. --levels picks levels
per perturbation (KIND:LEVEL,LEVEL...); without --perturbations it runs the kinds it names,
else every kind. Trailing KEY VALUE pairs override the config, as in train_net.py; OUTPUT_DIR
is OUT and TEST.EXPORT_DIR is off. --clean-only scores the split as it is, no perturbed copy,
and writes robustness.json alone (no plot); --convention imdl-benco perturbs by IMDL-BenCo's
JPEG and noise definitions (docs/EVALUATION.md lists the differences).

Writes OUT/robustness.json ({"clean": M, "jpeg": {"90": M, ...}, ..., "chain":
{"resize0.5+jpeg75": M}}, M holding auc, f1, iou, score, real_false_alarm as fractions, and
num_real, num_fake), OUT/robustness.png (one panel per perturbation), the log, and each
evaluation's ddl_metrics.json under OUT/inference/.
"""
import argparse
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import textwrap
import time
import zlib
from collections import OrderedDict

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")
import ddl_mask2former  # first: it hides detectron2's import-time torch.jit deprecation warning

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ddl_mask2former.config import load_config, split_config_overrides
from ddl_mask2former.data.ddl_dataset import default_cache_dir, load_ddl_split, register_ddl_split
from ddl_mask2former.data.image_io import DDLDataError, read_forgery_mask, read_image
from ddl_mask2former.engine import (CheckpointMismatchError, Trainer, check_evaluation_verdict, launch,
                                    load_evaluation_model)
from ddl_mask2former.evaluation.calibration import VerdictCalibrationError
from ddl_mask2former.data.perturbations import (
    CONVENTIONS, SWEEPS, level_key, parse_level, perturb, perturb_mask)

TOOL = "robustness.py"
# robustness.json metric keys -> DDLEvaluator result keys (percent)
METRICS = OrderedDict(auc="AUC", f1="F1", iou="IoU", score="score", real_false_alarm="real_false_alarm")
# Plotted per panel: key, legend label, colour.
PLOTTED = (("auc", "AUC", "tab:blue"), ("f1", "F1 (per image)", "tab:orange"),
           ("iou", "IoU (per image)", "tab:green"), ("real_false_alarm", "real images > 1 % marked", "tab:red"))
PANEL_TITLES = {"jpeg": "JPEG recompression", "blur": "Gaussian blur", "noise": "Gaussian noise",
                "resize": "resize (INTER_AREA)", "chain": "chain"}
AXIS_LABELS = {"jpeg": "quality", "blur": "kernel size k (OpenCV default sigma)",
               "noise": "variance (8-bit units)", "resize": "scale factor", "chain": ""}
SCRATCH_DIR = "images"
# the loggers detectron2 and this tool set up (console quiet, full log in OUT/log.txt)
LOGGERS = ("detectron2", "ddl_mask2former", "fvcore")
CLEAN = "clean"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--split", required=True, metavar="DIR",
                        help="labeled split folder in DDL layout (real/, fake/, masks/ or mask/)")
    parser.add_argument("--output", required=True, metavar="OUT",
                        help="folder for robustness.json, robustness.png, logs and scratch copies")
    parser.add_argument("--perturbations", nargs="+", default=None, metavar="KIND",
                        help=f"subset of: {' '.join(SWEEPS)} (default: all, or those --levels names)")
    parser.add_argument("--levels", nargs="+", default=None, metavar="KIND:LEVEL[,LEVEL...]",
                        help="restrict levels, e.g. jpeg:90,70 resize:0.5 (levels: "
                             + "; ".join(f"{kind} {','.join(map(level_key, levels))}"
                                         for kind, levels in SWEEPS.items()) + ")")
    parser.add_argument("--clean-only", action="store_true",
                        help="score the split as it is, no perturbed copies (held-out sets)")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes (GPUs, or CPU processes when MODEL.DEVICE is cpu)")
    parser.add_argument("--dist-url", default="auto", help="rendezvous address with --num-gpus > 1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise perturbation (>= 0)")
    parser.add_argument("--convention", choices=CONVENTIONS, default="ours",
                        help="perturbation definitions: ours (docs/EVALUATION.md) or imdl-benco (its JPEG "
                             "quality draw and channel order, and its truncated noise), so that a table can "
                             "sit beside IMDL-BenCo's")
    parser.add_argument("--keep-images", action="store_true",
                        help="keep every perturbed copy under OUT/images/ (default: delete once scored)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    # "--levels jpeg:90 MODEL.WEIGHTS w": the overrides end the lists.
    options, overrides = split_config_overrides(argv)
    args = parser.parse_args(options)
    args.opts = list(args.opts) + overrides
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    misplaced = next((value for value in args.opts if value.startswith("--")), None)
    if misplaced:
        parser.error(f"{misplaced} comes after the KEY VALUE overrides; put options before them")
    return args


def build_plan(perturbations, levels):
    """OrderedDict kind -> levels to run, in SWEEPS order; SystemExit naming a bad kind or level."""
    for kind in perturbations or ():
        if kind not in SWEEPS:
            raise SystemExit(f"{TOOL}: unknown perturbation {kind!r} in --perturbations "
                             f"(known: {', '.join(SWEEPS)})")
    chosen = {}
    for item in levels or ():
        kind, sep, texts = item.partition(":")
        if not sep or not texts.strip(","):
            raise SystemExit(f"{TOOL}: --levels {item!r}: expected KIND:LEVEL[,LEVEL...], e.g. jpeg:90,70")
        if kind not in SWEEPS:
            raise SystemExit(f"{TOOL}: --levels {item!r}: unknown perturbation {kind!r} "
                             f"(known: {', '.join(SWEEPS)})")
        if perturbations and kind not in perturbations:
            raise SystemExit(f"{TOOL}: --levels {item!r}: {kind} is not among --perturbations "
                             f"({' '.join(perturbations)})")
        for text in filter(None, texts.split(",")):
            try:
                chosen.setdefault(kind, set()).add(parse_level(kind, text))
            except ValueError as exc:
                raise SystemExit(f"{TOOL}: --levels {item!r}: {exc}") from None
    kinds = perturbations or (list(chosen) if chosen else list(SWEEPS))
    return OrderedDict((kind, [level for level in SWEEPS[kind] if kind not in chosen or level in chosen[kind]])
                       for kind in SWEEPS if kind in kinds)


def load_checked_config(args):
    """The run's config (frozen); SystemExit naming a missing file, a bad key or missing weights."""
    try:
        cfg = load_config(args.config_file, args.opts, freeze=False)
    except FileNotFoundError as exc:
        raise SystemExit(f"{TOOL}: {exc}") from None
    except (KeyError, ValueError, AssertionError) as exc:
        raise SystemExit(f"{TOOL}: bad config override in {' '.join(args.opts)!r}: {exc}") from None
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise SystemExit(f"{TOOL}: no weights: add MODEL.WEIGHTS path/to/model_final.pth "
                         f"(the config {args.config_file} sets none)")
    if "://" not in weights and not os.path.isfile(weights):
        raise SystemExit(f"{TOOL}: MODEL.WEIGHTS file not found: {weights}")
    cfg.OUTPUT_DIR = os.path.abspath(args.output)
    cfg.TEST.EXPORT_DIR = ""  # every level would overwrite the last one's export
    cfg.freeze()
    return cfg


def check_split(split_dir):
    """Index the split once before anything is written; SystemExit naming what is wrong."""
    if not os.path.isdir(split_dir):
        raise SystemExit(f"{TOOL}: --split folder not found: {split_dir}")
    try:
        dicts = load_ddl_split(split_dir, cache_dir=default_cache_dir())
    except DDLDataError as exc:
        raise SystemExit(f"{TOOL}: --split: {exc}") from None
    if any("label" not in d for d in dicts):
        raise SystemExit(f"{TOOL}: --split {split_dir} is a flat, unlabeled folder; the benchmark needs "
                         "real/ and fake/ (with masks/) to score")
    return dicts


def _share_cpu_threads(cfg):
    """Give each CPU process an equal share of the cores instead of all of them each."""
    if torch.device(cfg.MODEL.DEVICE).type == "cpu" and comm.get_local_size() > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))


def _register(name, split_dir, cache_dir):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_ddl_split(name, split_dir, cache_dir=cache_dir)


def _tag(kind, level):
    return CLEAN if kind == CLEAN else f"{kind}_{level_key(level)}"


def _write_png(path, image):
    data = image[:, :, ::-1] if image.ndim == 3 else image
    if not cv2.imwrite(path, np.ascontiguousarray(data), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"{path}: OpenCV could not write the PNG")


def noise_rng(seed, kind, image_id):
    """The generator of one image: the seed and the image's id, so the output does not depend on
    the order or the process the image is perturbed in, and every level of a kind draws the same
    standard-normal field (only its scale changes)."""
    return np.random.default_rng([seed, zlib.crc32(f"{kind}/{image_id}".encode("utf-8"))])


def write_perturbed_split(dataset_dicts, out_dir, kind, level, seed, mask_threshold, rank=0, world_size=1,
                          convention="ours"):
    """Write the images of ``dataset_dicts`` (labeled DDL dicts) perturbed, in DDL layout under
    ``out_dir`` (PNG, named by stem); this process writes every ``world_size``-th image from
    ``rank``. A fake's mask is copied, or, when the image changed size, read (pixels above
    ``mask_threshold`` forged) and resized by ``resize_mask`` (nearest neighbour, pixel centres)."""
    for folder in ("real", "fake", "masks"):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    for index in range(rank, len(dataset_dicts), world_size):
        record = dataset_dicts[index]
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        image = read_image(record["file_name"], format="RGB")
        perturbed = perturb(image, kind, level, noise_rng(seed, kind, record["image_id"]), convention)
        fake = record["label"] == 1
        _write_png(os.path.join(out_dir, "fake" if fake else "real", stem + ".png"), perturbed)
        if not fake:
            continue
        mask_file = record["mask_file"]
        if perturbed.shape[:2] == image.shape[:2]:
            shutil.copyfile(mask_file, os.path.join(out_dir, "masks", stem + os.path.splitext(mask_file)[1]))
        else:
            mask = perturb_mask(read_forgery_mask(mask_file, mask_threshold), kind, level, perturbed.shape[:2])
            _write_png(os.path.join(out_dir, "masks", stem + ".png"), mask.astype(np.uint8) * 255)


def _metrics_of(results):
    """robustness.json's M from Trainer.test's results (percent -> fractions; NaN -> None)."""
    ddl = results.get("ddl", {})
    metrics = OrderedDict()
    for key, result_key in METRICS.items():
        value = ddl.get(result_key)
        metrics[key] = None if value is None or not math.isfinite(value) else value / 100.0
    metrics["num_real"] = int(ddl.get("num_real", 0))
    metrics["num_fake"] = int(ddl.get("num_fake", 0))
    return metrics


def _format_duration(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def _format_metrics(metrics):
    shown = (("auc", "AUC"), ("f1", "F1"), ("iou", "IoU"), ("real_false_alarm", "real>1%"))
    return "  ".join(f"{name} " + ("n/a" if metrics[key] is None else f"{metrics[key]:.3f}")
                     for key, name in shown)


def setup(args):
    cfg = load_checked_config(args)
    rank = comm.get_rank()
    # The loggers default_setup configures, set up first with the same arguments (setup_logger
    # caches them), so that their console handlers are quiet before it logs the environment.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name="fvcore")
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=rank, name="ddl_mask2former")
    _quiet_console()
    default_setup(cfg, argparse.Namespace(**vars(args), eval_only=True))
    return cfg


def _quiet_console():
    """The terminal gets the progress lines and warnings; the full log goes to OUT/log.txt only."""
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            # detectron2 writes its log file through a StreamHandler too: tell them by stream
            if getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
                handler.setLevel(logging.WARNING)


def load_model(cfg, opts=(), check_only=False):
    """The model with its weights and a verdict fit for evaluation, as tools/train_net.py
    --eval-only has it (``engine.load_evaluation_model``; ``check_only``: the checks alone, before
    launch); SystemExit saying how to go on when the verdict cannot be calibrated or the checkpoint
    does not fit the config's model."""
    try:
        if check_only:
            return check_evaluation_verdict(cfg, opts)
        return load_evaluation_model(cfg, opts)
    except (CheckpointMismatchError, VerdictCalibrationError) as exc:
        raise SystemExit(f"{TOOL}: {exc}") from None


def evaluate(cfg, model, dataset_name):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (dataset_name,)
    cfg.freeze()
    return _metrics_of(Trainer.test(cfg, model))


def run(args, plan):
    """One process of the benchmark: every evaluation in turn; the main process writes the results."""
    cfg = setup(args)
    _share_cpu_threads(cfg)
    model = load_model(cfg, args.opts)
    rank, world_size, main = comm.get_rank(), comm.get_world_size(), comm.is_main_process()
    output = cfg.OUTPUT_DIR
    clean_name = "robustness_clean"
    _register(clean_name, os.path.abspath(args.split), "default")
    clean_dicts = DatasetCatalog.get(clean_name)
    evaluations = [(CLEAN, None)] + [(kind, level) for kind, levels in plan.items() for level in levels]
    results, durations = OrderedDict(), []
    for number, (kind, level) in enumerate(evaluations, start=1):
        start = time.monotonic()
        if kind == CLEAN:
            metrics = evaluate(cfg, model, clean_name)
        else:
            scratch = os.path.join(output, SCRATCH_DIR, _tag(kind, level))
            if main and os.path.exists(scratch):
                shutil.rmtree(scratch)  # a kept copy of an earlier run
            comm.synchronize()
            try:
                write_perturbed_split(clean_dicts, scratch, kind, level, args.seed, cfg.INPUT.MASK_THRESHOLD,
                                      rank, world_size, args.convention)
                comm.synchronize()
                name = f"robustness_{_tag(kind, level)}"
                _register(name, scratch, None)
                metrics = evaluate(cfg, model, name)
                comm.synchronize()
            finally:
                if main and not args.keep_images:
                    shutil.rmtree(scratch, ignore_errors=True)
        durations.append(time.monotonic() - start)
        if not main:
            continue
        if kind == CLEAN:
            results[CLEAN] = metrics
        else:
            results.setdefault(kind, OrderedDict())[level_key(level)] = metrics
        # The clean pass writes no images: time the perturbed ones once there are any.
        per_evaluation = np.mean(durations[1:] if len(durations) > 1 else durations)
        eta = per_evaluation * (len(evaluations) - number)
        label = CLEAN if kind == CLEAN else f"{kind} {level_key(level)}"
        print(f"[{number}/{len(evaluations)}] {label}: {_format_metrics(metrics)}  "
              f"({durations[-1]:.1f} s; ETA {_format_duration(eta)})", flush=True)
    if main:
        if not args.keep_images:
            try:
                os.rmdir(os.path.join(output, SCRATCH_DIR))
            except OSError:
                pass
        title = (f"{os.path.basename(cfg.MODEL.WEIGHTS)} on {os.path.abspath(args.split)} "
                 f"({results[CLEAN]['num_real']} real, {results[CLEAN]['num_fake']} fake images)")
        path = _write_json(results, os.path.join(output, "robustness.json"))
        png = plot_robustness(results, os.path.join(output, "robustness.png"), title) if plan else None
        for name in LOGGERS:
            for handler in logging.getLogger(name).handlers:
                handler.flush()  # detectron2's log file is block-buffered
        print(f"wrote {path}{f' and {png}' if png else ''} (total {_format_duration(sum(durations))}; "
              f"full log: {os.path.join(output, 'log.txt')})", flush=True)
    return results


def _write_json(results, path):
    tmp_path = f"{path}.tmp.{os.getpid()}"
    with open(tmp_path, "w") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    os.replace(tmp_path, path)
    return path


def plot_robustness(results, out_png, title=None):
    """One panel per perturbation: AUC, F1, IoU and the real false-alarm rate (percent) against
    the level, mildest left; the clean value of each as a dashed line. Returns ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    kinds = [kind for kind in SWEEPS if kind in results]
    if not kinds:
        raise ValueError("no perturbation results to plot")
    width = max(3.6 * len(kinds) + 0.8, 6.5)
    legend_rows = 1 if len(kinds) >= 3 else 2
    figure, axes = plt.subplots(1, len(kinds), figsize=(width, 4.0 + 0.25 * legend_rows), squeeze=False)
    clean = results[CLEAN]
    for axis, kind in zip(axes[0], kinds):
        keys = list(results[kind])
        xs = list(range(len(keys)))
        for key, _label, color in PLOTTED:
            if clean.get(key) is not None:
                axis.axhline(100 * clean[key], color=color, linestyle="--", linewidth=1, alpha=0.7)
            ys = [np.nan if results[kind][k][key] is None else 100 * results[kind][k][key] for k in keys]
            axis.plot(xs, ys, color=color, marker="o")
        axis.set_xticks(xs)
        axis.set_xticklabels(keys, fontsize=9 if kind != "chain" else 8)
        axis.set_xlim(-0.5, len(keys) - 0.5)
        axis.set_ylim(-2, 102)
        axis.set_title(PANEL_TITLES[kind])
        axis.set_xlabel((AXIS_LABELS[kind] + "  (more severe →)") if len(keys) > 1 else AXIS_LABELS[kind])
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("percent")
    handles = [Line2D([], [], color=color, marker="o", label=label) for _key, label, color in PLOTTED]
    handles.append(Line2D([], [], color="gray", linestyle="--", label="clean (unperturbed)"))
    figure.legend(handles=handles, loc="lower center", ncol=math.ceil(len(handles) / legend_rows), frameon=False)
    if title:
        figure.suptitle(textwrap.fill(title, width=int(width * 13)), fontsize=10)
    figure.tight_layout(rect=(0, 0.06 * legend_rows + 0.02, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    tmp_path = f"{out_png}.tmp.{os.getpid()}.png"
    figure.savefig(tmp_path, dpi=100)
    plt.close(figure)
    os.replace(tmp_path, out_png)
    return out_png


def main(argv=None):
    args = parse_args(argv)
    if args.clean_only and (args.perturbations or args.levels):
        raise SystemExit(f"{TOOL}: --clean-only runs no perturbation; drop --perturbations/--levels")
    plan = OrderedDict() if args.clean_only else build_plan(args.perturbations, args.levels)
    if args.seed < 0:
        raise SystemExit(f"{TOOL}: --seed must be >= 0, got {args.seed}")
    if args.num_gpus < 1:
        raise SystemExit(f"{TOOL}: --num-gpus must be >= 1, got {args.num_gpus}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise SystemExit(f"{TOOL}: --output {args.output} exists and is not a folder")
    # Checked before launch: a bad input fails once, before anything is written.
    cfg = load_checked_config(args)
    dicts = check_split(args.split)
    load_model(cfg, args.opts, check_only=True)
    total = 1 + sum(len(levels) for levels in plan.values())
    print(f"{len(dicts)} images of {os.path.abspath(args.split)}, {total} evaluations: clean"
          + (", " if plan else "") + ", ".join(f"{kind} {' '.join(map(level_key, levels))}" for kind, levels in plan.items())
          + ("" if args.convention == "ours" or not plan else f" ({args.convention} definitions)"), flush=True)
    launch(run, args.num_gpus, dist_url=args.dist_url, args=(args, plan))


if __name__ == "__main__":
    main()
