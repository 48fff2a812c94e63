#!/usr/bin/env python
"""Throughput of the real training command, ``tools/train_net.py``, on generated DDL-I data.

    python benchmarks/bench_train_net.py [--batch 32] [--iters 60] [--json out.json]
    python benchmarks/bench_train_net.py --small          # CPU smoke test (tests/configs/tiny.yaml)

Writes a synthetic DDL-I split (``datasets/make_synthetic_ddl.py``, 256-768 px images), then runs
``train_net.py`` once per variant (default: AMP float16 with a GradScaler, as the paper config
has it, and AMP bfloat16) with the data loader, mapper, augmentations, hooks and logging all in
the loop, and reads detectron2's "Overall training speed" line (it leaves out the first
iterations) and the last logged losses. Images/s = batch / (s/it).

Extra variants: ``--variant NAME KEY VALUE [KEY VALUE ...]`` (config overrides), e.g.
``--variant compiled SOLVER.AMP.PRECISION bfloat16 SOLVER.COMPILE.MODULES "['backbone']"``.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, add_json_argument, write_json
SPEED = re.compile(r"Overall training speed: (\d+) iterations in (\S+) \(([\d.]+) s / it\)")
DEFAULT_VARIANTS = [["fp16", "SOLVER.AMP.PRECISION", "float16"], ["bf16", "SOLVER.AMP.PRECISION", "bfloat16"]]
SMALL_VARIANTS = [["fp32", "SOLVER.AMP.ENABLED", "False"],
                  ["bf16", "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"]]


def make_data(root, num_train, workers, small):
    sizes = ["--min-size", "64", "--max-size", "96"] if small else ["--min-size", "256", "--max-size", "768"]
    command = [sys.executable, str(ROOT / "datasets" / "make_synthetic_ddl.py"), "--out", str(root / "DDL-I"),
               "--num-train", str(num_train), "--num-val", "2", "--seed", "0", "--workers", str(workers), *sizes]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(f"synthetic DDL-I: {num_train} training images in {time.perf_counter() - start:.1f} s under {root}",
          flush=True)


def last_losses(output_dir):
    metrics = Path(output_dir) / "metrics.json"
    if not metrics.is_file():
        return {}
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    lines = [line for line in lines if "total_loss" in line]
    if not lines:
        return {}
    last = lines[-1]
    # detectron2 logs the median over its window of the wait for data and of the whole iteration.
    return {"iteration": last.get("iteration"), "data_time": last.get("data_time"), "time": last.get("time"),
            "total_loss": last["total_loss"],
            "loss_det": last.get("loss_det"), "loss_mask": last.get("loss_mask"),
            "loss_dice": last.get("loss_dice"), "loss_cls": last.get("loss_cls")}


def run_variant(name, overrides, args, data_root, scratch):
    output_dir = scratch / f"out_{name}"
    command = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--num-gpus", "1",
               "--config-file", str(args.config),
               "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(output_dir), "SOLVER.IMS_PER_BATCH", str(args.batch),
               "SOLVER.MAX_ITER", str(args.iters), "SOLVER.CHECKPOINT_PERIOD", "1000000",
               "SOLVER.LOG_PERIOD", str(max(1, min(20, args.iters // 3))), "TEST.EVAL_PERIOD", "0",
               "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", str(args.loader_workers), "SEED", "0",
               *args.overrides, *overrides]
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root), DDL_INDEX_CACHE="off", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    log = result.stdout + result.stderr
    (scratch / f"log_{name}.txt").write_text(log)
    match = SPEED.search(log)
    row = {"variant": name, "overrides": overrides, "returncode": result.returncode, "wall_s": round(wall, 1),
           "batch": args.batch, "losses": last_losses(output_dir)}
    if match:
        seconds = float(match.group(3))
        row.update({"timed_iters": int(match.group(1)), "s_per_it": seconds, "img_per_s": args.batch / seconds})
    if result.returncode != 0 or not match:
        row["log_tail"] = log[-3000:]
        print(f"{name}: FAILED (exit {result.returncode}); log tail:\n{log[-3000:]}", flush=True)
    else:
        print(f"{name}: {row['s_per_it']:.4f} s/it = {row['img_per_s']:.1f} img/s at batch {args.batch} "
              f"({row['timed_iters']} timed iterations, {wall:.0f} s wall); last losses {row['losses']}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ddl-i" / "ddl_mask2former_swin_tiny.yaml")
    parser.add_argument("--small", action="store_true", help="tiny config on the CPU, a few iterations")
    parser.add_argument("--batch", type=int, default=None, help="SOLVER.IMS_PER_BATCH (32; small: 2)")
    parser.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER (60; small: 6)")
    parser.add_argument("--num-train", type=int, default=None, help="generated training images (256; small: 8)")
    parser.add_argument("--loader-workers", type=int, default=None, help="DATALOADER.NUM_WORKERS (12; small: 0)")
    parser.add_argument("--data-workers", type=int, default=os.cpu_count() or 1, help="processes writing the data")
    parser.add_argument("--variant", nargs="+", action="append", metavar="NAME KEY VALUE",
                        help="a named set of config overrides (repeatable); replaces the default fp16 and bf16 runs")
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides for every variant")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per train_net run")
    parser.add_argument("--keep", type=Path, help="keep data, logs and outputs in this folder")
    add_json_argument(parser)
    args = parser.parse_args()
    args.config = args.config.resolve()
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    defaults = {"batch": (32, 2), "iters": (60, 6), "num_train": (256, 8), "loader_workers": (12, 0)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.small else full)
    if args.small:
        args.config = ROOT / "tests" / "configs" / "tiny.yaml"
        args.overrides = ["MODEL.DEVICE", "cpu", *args.overrides]
    variants = args.variant or (SMALL_VARIANTS if args.small else DEFAULT_VARIANTS)
    for variant in variants:
        if len(variant) % 2 != 1:
            parser.error(f"--variant {' '.join(variant)}: a name, then KEY VALUE pairs")

    scratch_context = tempfile.TemporaryDirectory(prefix="ddl_train_net_") if args.keep is None else None
    scratch = Path(scratch_context.name) if scratch_context else args.keep
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        make_data(scratch / "datasets", args.num_train, args.data_workers, args.small)
        rows = [run_variant(v[0], v[1:], args, scratch / "datasets", scratch) for v in variants]
    finally:
        if scratch_context:
            scratch_context.cleanup()
    print(f"\ntools/train_net.py, {args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}, batch {args.batch}, {args.iters} iterations")
    print("| variant | s/it | img/s | last total_loss |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        if "s_per_it" in row:
            print(f"| {row['variant']} | {row['s_per_it']:.4f} | {row['img_per_s']:.1f} | "
                  f"{row['losses'].get('total_loss', float('nan')):.3f} |")
        else:
            print(f"| {row['variant']} | failed (exit {row['returncode']}) | | |")
    write_json(args.json, {"config": str(args.config), "rows": rows})
    if any("s_per_it" not in row for row in rows):
        raise SystemExit("bench_train_net.py: a variant failed (log tail above)")


if __name__ == "__main__":
    main()
