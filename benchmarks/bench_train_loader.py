#!/usr/bin/env python
"""How long the training loop waits for data: detectron2's training loader as train_net.py builds
it, with and without aspect-ratio grouping, feeding a simulated model step.

    python benchmarks/bench_train_loader.py                       # paper config, batch 32, 12 workers
    python benchmarks/bench_train_loader.py --workers 2 --batch 16 --step-ms 400   # a 2-core machine

Writes a synthetic DDL-I split (``datasets/make_synthetic_ddl.py``, 256-768 px images, as
``bench_train_net.py``), builds ``Trainer.build_train_loader`` for the config once per variant
and iterates it while the main thread sleeps ``--step-ms`` per batch, as it waits for a
GPU-bound step. Reports the wait for each batch (what detectron2 logs as ``data_time``) and the
images per second delivered.

With ``DATALOADER.ASPECT_RATIO_GROUPING True`` (detectron2's default) the workers yield single
samples and the main process groups them into batches; each worker keeps only
``prefetch_factor`` (2) samples ready, so 12 workers hold 24 samples: less than one batch of 32,
and the loop waits for the rest every step. Without grouping each worker builds whole batches
and keeps two of them ready. Training crops all have the crop size (``PadToSize``), so grouping
by aspect ratio has nothing to group there.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, add_json_argument, write_json
sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(cfg_file, grouping, args, data_root):
    os.environ["DETECTRON2_DATASETS"] = str(data_root)
    os.environ["DDL_INDEX_CACHE"] = "off"
    from detectron2.config import get_cfg

    from ddl_mask2former import add_ddl_mask2former_config
    from ddl_mask2former.engine import Trainer

    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file(str(cfg_file))
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", args.batch, "DATALOADER.NUM_WORKERS", args.workers,
                         "DATALOADER.ASPECT_RATIO_GROUPING", grouping, "SEED", 0])
    loader = iter(Trainer.build_train_loader(cfg))
    start = time.perf_counter()
    next(loader)  # workers start, first batch
    first = time.perf_counter() - start
    waits = []
    start = time.perf_counter()
    for _ in range(args.iters):
        before = time.perf_counter()
        batch = next(loader)
        waits.append(time.perf_counter() - before)
        assert len(batch) == args.batch
        time.sleep(args.step_ms / 1000)
    total = time.perf_counter() - start
    del loader
    row = {"aspect_ratio_grouping": grouping, "first_batch_s": round(first, 2),
           "wait_median_s": statistics.median(waits), "wait_mean_s": statistics.fmean(waits),
           "img_per_s": args.batch * args.iters / total, "step_ms": args.step_ms}
    print(f"grouping {str(grouping):5s}: wait per batch median {row['wait_median_s']:.3f} s, mean "
          f"{row['wait_mean_s']:.3f} s; {row['img_per_s']:.1f} img/s delivered (a step alone would allow "
          f"{1000 * args.batch / args.step_ms:.1f}); first batch {first:.1f} s", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ddl-i" / "ddl_mask2former_swin_tiny.yaml")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=12, help="DATALOADER.NUM_WORKERS")
    parser.add_argument("--iters", type=int, default=20, help="timed batches after the first")
    parser.add_argument("--step-ms", type=float, default=300, help="simulated model step per batch")
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--data-workers", type=int, default=os.cpu_count() or 1)
    add_json_argument(parser)
    args = parser.parse_args()

    from bench_train_net import make_data

    with tempfile.TemporaryDirectory(prefix="ddl_train_loader_") as scratch:
        data_root = Path(scratch) / "datasets"
        make_data(data_root, args.num_train, args.data_workers, small=False)
        print(f"{args.config.relative_to(ROOT)}: batch {args.batch}, {args.workers} workers, "
              f"{args.iters} batches, simulated step {args.step_ms:.0f} ms", flush=True)
        rows = [measure(args.config, grouping, args, data_root) for grouping in (True, False)]
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
