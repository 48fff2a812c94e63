#!/usr/bin/env python
"""Large images: resize to the base scale vs tiled inference at native resolution vs tiled + flip.

    python benchmarks/bench_tiled_inference.py --config-file CFG --weights MODEL.pth \
        [--num-images 40] [--min-size 1500] [--max-size 3000] [--difficulty easy] \
        [--tile-size 512] [--overlap 64] [--tile-batch 1] [--out-dir DIR]

Makes (once, then reuses) a labeled val split of large images with the project's synthetic
generator (``ddl_mask2former.data.synthetic.generate_split``, half fake), then evaluates the
checkpoint on it in each mode, each in its own fresh process so that its peak RSS is its own:

* ``resize``: today's path, the test mapper's ``INPUT.BASE_SCALE`` resize;
* ``tiled``: ``TEST.TILE.ENABLED`` (native pixels: the test ``DDLDatasetMapper`` skips the resize);
* ``tiled_flip``: the same with ``TEST.AUG.ENABLED`` (horizontal-flip TTA).

AUC, F1 and IoU come from ``DDLEvaluator`` (F1/IoU: per-image mean at threshold 0.5, the
headline, and dataset-level; AUC with the ``TEST.TILE.FAKE_PROB`` rule in use, each image scored
as evaluation scores it, through ``TiledInference.predict``). The AUC of every other rule comes
from the same run: the tiles' scores of the tiled mode and, for the rules that use the global
view, the resize mode's score (the global view is that same resize, without flip). Speed: wall
and CPU seconds of the model call per megapixel of native image (decoding not counted). Memory: the
mode process's peak RSS. Then, unless ``--memory-sizes`` is empty, peak RSS of
``ForgeryPredictor`` on one random image of each size (e.g. 8000x6000) per mode, again one
fresh process each. Everything runs on ``MODEL.DEVICE`` of the config (``--opts`` overrides).
Results: a table on stdout, ``results.json`` and ``results.md`` in ``--out-dir``.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import require_package

require_package()

MODES = ("resize", "tiled", "tiled_flip")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", required=True, metavar="FILE", help="checkpoint (MODEL.WEIGHTS)")
    parser.add_argument("--num-images", type=int, default=40)
    parser.add_argument("--min-size", type=int, default=1500, help="smallest image side in pixels")
    parser.add_argument("--max-size", type=int, default=3000, help="largest image side in pixels")
    parser.add_argument("--difficulty", default="easy", help="synthetic trace level (easy/medium/hard)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile-size", type=int, default=512, help="TEST.TILE.SIZE")
    parser.add_argument("--overlap", type=int, default=64, help="TEST.TILE.OVERLAP")
    parser.add_argument("--tile-batch", type=int, default=1, help="TEST.TILE.BATCH_SIZE")
    parser.add_argument("--fake-prob", default=None,
                        help="TEST.TILE.FAKE_PROB of the tiled modes (default: the config's); the AUC of "
                             "every rule is reported too")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES,
                        help="modes to evaluate on the split (none: only the memory check)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: default)")
    parser.add_argument("--data-dir", default="/tmp/ddl_bench_tiled",
                        help="where the generated val splits are kept (one subfolder per setting)")
    parser.add_argument("--out-dir", default="output/bench_tiled_inference")
    parser.add_argument("--memory-sizes", nargs="*", default=["4000x3000", "8000x6000"],
                        metavar="WxH", help="image sizes for the peak-memory check (none: skip)")
    parser.add_argument("--memory-modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE overrides")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for path, what in ((args.config_file, "config file"), (args.weights, "weights file")):
        if not os.path.isfile(path):
            parser.error(f"{what} not found: {path}")
    if not 8 <= args.min_size <= args.max_size:
        parser.error(f"need 8 <= --min-size <= --max-size, got {args.min_size}, {args.max_size}")
    if args.num_images < 2:
        parser.error("--num-images must be at least 2 (one real, one fake)")
    for size in args.memory_sizes:
        _parse_size(size, parser)
    return args


def _parse_size(text, parser=None):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
        if width < 1 or height < 1:
            raise ValueError
    except ValueError:
        message = f"--memory-sizes: expected WIDTHxHEIGHT like 8000x6000, got {text!r}"
        if parser is None:
            raise SystemExit(message)
        parser.error(message)
    return width, height


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- in a child process ----------------------------------------------------------------------

def _build(args, mode):
    import torch
    from detectron2.config import get_cfg

    from ddl_mask2former import ForgeryPredictor, add_ddl_mask2former_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    cfg.TEST.TILE.ENABLED = mode != "resize"
    cfg.TEST.TILE.SIZE, cfg.TEST.TILE.OVERLAP = args.tile_size, args.overlap
    cfg.TEST.TILE.BATCH_SIZE = args.tile_batch
    if args.fake_prob:
        cfg.TEST.TILE.FAKE_PROB = args.fake_prob
    cfg.TEST.AUG.ENABLED = mode == "tiled_flip"
    cfg.freeze()
    return ForgeryPredictor(cfg)


def evaluate_mode(args, mode, split_dir):
    """One mode over the split: per-image scores, DDLEvaluator results, time, peak RSS."""
    import torch

    from ddl_mask2former.data.ddl_dataset import load_ddl_split
    from ddl_mask2former.evaluation import DDLEvaluator
    from ddl_mask2former.data import DDLDatasetMapper

    predictor = _build(args, mode)
    model, mapper = predictor.model, DDLDatasetMapper(predictor.cfg, is_train=False)
    evaluator = DDLEvaluator(f"bench_{mode}", distributed=False)
    evaluator.reset()
    dataset = load_ddl_split(split_dir)
    baseline_mib = _peak_rss_mib()
    images, wall, cpu, megapixels = [], 0.0, 0.0, 0.0
    with torch.no_grad():
        for record in dataset:
            model_input = mapper(record)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            if model.tiling is None:
                output = model([model_input])[0]
                tile_probs = None
            else:
                # The model's own tiled path (TiledInference.__call__), split in two calls to
                # keep every tile's score; an image that fits in one tile goes the same way.
                prediction = model.tiling.predict(model_input, model.predict_views)
                output = model.tiling.image_output(prediction)
                tile_probs = prediction.tile_fake_probs
            wall += time.perf_counter() - wall_start
            cpu += time.process_time() - cpu_start
            megapixels += record["height"] * record["width"] / 1e6
            evaluator.process([model_input], [output])
            images.append({"name": record["image_id"], "label": int(record["label"]),
                           "fake_prob": float(output["fake_prob"]),
                           "tile_fake_probs": None if tile_probs is None else tile_probs.tolist()})
            print(f"  {mode}: {len(images)}/{len(dataset)} {record['width']}x{record['height']} "
                  f"{wall:.0f} s", file=sys.stderr, flush=True)
    results = evaluator.evaluate()["ddl"]
    rule = None if model.tiling is None else model.tiling.fake_prob_rule
    return {"mode": mode, "fake_prob_rule": rule, "images": images, "ddl": results, "wall_s": wall, "cpu_s": cpu,
            "megapixels": megapixels, "peak_rss_mib": _peak_rss_mib(),
            "rss_before_images_mib": baseline_mib}


def measure_memory(args, mode, size):
    """Peak RSS of ForgeryPredictor on one random image of ``size`` (W, H)."""
    import numpy as np

    predictor = _build(args, mode)
    width, height = size
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    before = _peak_rss_mib()
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    output = predictor(rgb)
    return {"mode": mode, "size": f"{width}x{height}", "peak_rss_mib": _peak_rss_mib(),
            "rss_before_mib": before, "wall_s": time.perf_counter() - wall_start,
            "cpu_s": time.process_time() - cpu_start, "mask_shape": list(output["mask_prob"].shape)}


# --- the parent ------------------------------------------------------------------------------

def make_split(args):
    from ddl_mask2former.data.synthetic import generate_split

    name = f"{args.difficulty}_n{args.num_images}_{args.min_size}-{args.max_size}_seed{args.seed}"
    root = os.path.join(args.data_dir, name)
    split_dir = os.path.join(root, "val")
    if os.path.isfile(os.path.join(root, "manifest_val.jsonl")):
        print(f"val split: reusing {split_dir}", flush=True)
        return split_dir
    print(f"val split: generating {args.num_images} {args.difficulty} images of "
          f"{args.min_size}-{args.max_size} px in {split_dir}", flush=True)
    start = time.perf_counter()
    generate_split(root, "val", args.num_images, seed=args.seed, min_size=args.min_size,
                   max_size=args.max_size, difficulty=args.difficulty, workers=1)
    print(f"val split: done in {time.perf_counter() - start:.0f} s", flush=True)
    return split_dir


def _run_child(argv, what):
    """Run this script with --child in a fresh process; its last stdout line is its JSON result."""
    command = [sys.executable, os.path.abspath(__file__)] + argv
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{what} failed (exit {completed.returncode}); its error is above")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _child_argv(args, child):
    argv = ["--child", child, "--config-file", args.config_file, "--weights", args.weights,
            "--num-images", str(args.num_images), "--min-size", str(args.min_size),
            "--max-size", str(args.max_size), "--difficulty", args.difficulty,
            "--seed", str(args.seed), "--tile-size", str(args.tile_size),
            "--overlap", str(args.overlap), "--tile-batch", str(args.tile_batch),
            "--threads", str(args.threads),
            "--data-dir", args.data_dir, "--memory-sizes"]
    argv += ["--fake-prob", args.fake_prob] if args.fake_prob else []
    return argv + (["--opts"] + list(args.opts) if args.opts else [])


def rule_aucs(runs):
    """AUC of every TEST.TILE.FAKE_PROB rule per tiled mode (global view = the resize run's score)."""
    import torch

    from ddl_mask2former.evaluation.metrics import roc_auc
    from ddl_mask2former.modeling.tiled_inference import FAKE_PROB_RULES

    global_scores = {}
    if "resize" in runs:
        global_scores = {image["name"]: image["fake_prob"] for image in runs["resize"]["images"]}
    table = {}
    for mode, run in runs.items():
        if mode == "resize":
            continue
        table[mode] = {}
        for rule, combine in FAKE_PROB_RULES.items():
            if "global" in rule and not global_scores:
                continue
            labels, scores = [], []
            for image in run["images"]:
                whole = torch.tensor(global_scores.get(image["name"], float("nan")))
                scores.append(float(combine(torch.tensor(image["tile_fake_probs"]), whole)))
                labels.append(image["label"])
            table[mode][rule] = 100.0 * roc_auc(labels, scores)
    return table


def format_tables(runs, aucs, memory):
    lines = ["| mode | fake_prob | AUC | F1 | IoU | F1 (dataset) | IoU (dataset) | real px marked forged % "
             "| wall s/MP | CPU s/MP | peak RSS MiB |", "|---" * 11 + "|"]
    for mode, run in runs.items():
        ddl = run["ddl"]
        lines.append(f"| {mode} | {run['fake_prob_rule'] or 'whole image'} | {ddl['AUC']:.1f} | {ddl['F1']:.1f} | {ddl['IoU']:.1f} | {ddl['F1_pixel']:.1f} "
                     f"| {ddl['IoU_pixel']:.1f} | {ddl['real_forged_frac']:.1f} "
                     f"| {run['wall_s'] / run['megapixels']:.2f} | {run['cpu_s'] / run['megapixels']:.2f} "
                     f"| {run['peak_rss_mib']:.0f} |")
    if aucs:
        rules = sorted({rule for mode_aucs in aucs.values() for rule in mode_aucs})
        lines += ["", "AUC by TEST.TILE.FAKE_PROB rule (global view: the resize run's score, also for tiled_flip):", "",
                  "| mode | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
        for mode, mode_aucs in aucs.items():
            lines.append(f"| {mode} | " + " | ".join(f"{mode_aucs.get(r, float('nan')):.1f}" for r in rules) + " |")
    if memory:
        lines += ["", "ForgeryPredictor on one random image:", "",
                  "| size | mode | peak RSS MiB | peak RSS before the call MiB | wall s | CPU s |", "|---" * 6 + "|"]
        for item in memory:
            lines.append(f"| {item['size']} | {item['mode']} | {item['peak_rss_mib']:.0f} "
                         f"| {item['rss_before_mib']:.0f} | {item['wall_s']:.1f} | {item['cpu_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        kind, _, rest = args.child.partition(":")
        if kind == "mode":
            mode, _, split_dir = rest.partition(":")
            result = evaluate_mode(args, mode, split_dir)
        else:
            mode, _, size = rest.partition(":")
            result = measure_memory(args, mode, _parse_size(size))
        print(json.dumps(result))
        return 0

    split_dir = make_split(args) if args.modes else None
    runs, memory = {}, []
    # Results are rewritten after every step, so an interrupted run keeps what it measured.
    for mode in args.modes:
        print(f"mode {mode}: evaluating {split_dir}", flush=True)
        runs[mode] = _run_child(_child_argv(args, f"mode:{mode}:{split_dir}"), f"mode {mode}")
        write_results(args, split_dir, runs, memory)
    for size in args.memory_sizes:
        for mode in args.memory_modes:
            print(f"memory check: {mode} on {size}", flush=True)
            memory.append(_run_child(_child_argv(args, f"memory:{mode}:{size}"), f"memory {mode} {size}"))
            write_results(args, split_dir, runs, memory)
    setting, table, json_path = write_results(args, split_dir, runs, memory)
    print(f"\n{setting}\n\n{table}\n")
    print(f"results written to {os.path.abspath(json_path)} and results.md beside it")
    return 0


def write_results(args, split_dir, runs, memory):
    aucs = rule_aucs(runs)
    table = format_tables(runs, aucs, memory)
    data = (f"{args.num_images} {args.difficulty} images, {args.min_size}-{args.max_size} px, seed "
            f"{args.seed}; " if runs else "")
    setting = (f"{data}tile {args.tile_size}, overlap {args.overlap}, tile batch {args.tile_batch}; "
               f"{args.threads or 'default'} torch thread(s)")
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "results.json")
    with open(json_path, "w") as handle:
        json.dump({"setting": vars(args), "split_dir": split_dir, "runs": runs, "rule_auc": aucs,
                   "memory": memory}, handle, indent=1)
    with open(os.path.join(args.out_dir, "results.md"), "w") as handle:
        handle.write(f"{setting}\n\n{table}\n")
    return setting, table, json_path


if __name__ == "__main__":
    sys.exit(main())
