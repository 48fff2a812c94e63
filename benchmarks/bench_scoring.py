#!/usr/bin/env python
"""Offline scoring throughput and peak memory at 1k and 10k generated 512x512 images.

    python benchmarks/bench_scoring.py [--sizes 1000 10000] [--workers 1 2] [--out-json F]

For each size a split in DDL layout (80 % fake, like DDL-I's ratio) and a matching export
(prediction.txt + mask/) are generated in a temporary folder; then every (size, workers) pair
is scored by ``score_export`` in a fresh Python process, so peak RSS belongs to that run alone.
Reported: images/s of the whole scoring call (split indexing, reading prediction.txt,
decoding both masks of every fake and the prediction of every real), CPU milliseconds per
image over all threads (independent of other load on the machine), and peak RSS before
(after imports) and after scoring. Runs of one invocation are side by side on the same
machine state; compare them as ratios on a busy machine.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

SIZE = 512
FAKE_FRACTION = 0.8
# distinct encoded masks to draw from: decoding cost depends on content, not on uniqueness
POOL = 64


def _ellipse_mask(rng, shift=0):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    center = (int(rng.integers(100, 412)) + shift, int(rng.integers(100, 412)))
    axes = (int(rng.integers(20, 120)), int(rng.integers(20, 120)))
    cv2.ellipse(mask, center, axes, float(rng.integers(0, 180)), 0, 360, 255, -1)
    return mask


def generate(root, num_images, seed=0):
    """Write ``root/split`` (real/, fake/, masks/) and ``root/pred`` (prediction.txt, mask/)."""
    rng = np.random.default_rng(seed)
    split, pred = os.path.join(root, "split"), os.path.join(root, "pred")
    for folder in ("split/real", "split/fake", "split/masks", "pred/mask"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    image_png = cv2.imencode(".png", rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))[1].tobytes()
    pairs = []
    for _ in range(POOL):
        gt = _ellipse_mask(rng)
        # the prediction: the same kind of blob, slightly shifted and resized
        predicted = cv2.dilate(np.roll(gt, int(rng.integers(-15, 15)), axis=1),
                               np.ones((5, 5), np.uint8)) if rng.random() < 0.9 else 0 * gt
        pairs.append((cv2.imencode(".png", gt)[1].tobytes(),
                      cv2.imencode(".png", predicted)[1].tobytes()))
    real_preds = [cv2.imencode(".png", _ellipse_mask(rng) if i % 4 == 0 else
                               np.zeros((SIZE, SIZE), np.uint8))[1].tobytes() for i in range(POOL)]
    lines = []
    for index in range(num_images):
        fake = index < FAKE_FRACTION * num_images
        name = f"{index:07d}.png"
        with open(os.path.join(split, "fake" if fake else "real", name), "wb") as f:
            f.write(image_png)
        gt_png, pred_png = pairs[index % POOL] if fake else (None, real_preds[index % POOL])
        if fake:
            with open(os.path.join(split, "masks", name), "wb") as f:
                f.write(gt_png)
        with open(os.path.join(pred, "mask", name), "wb") as f:
            f.write(pred_png)
        lines.append(f"{name},{min(1.0, 0.3 * fake + 0.7 * rng.random())!r}\n")
    with open(os.path.join(pred, "prediction.txt"), "w") as f:
        f.writelines(lines)
    return split, pred


def measure(split, pred, workers):
    """Score once in this process; print one JSON line."""
    from ddl_mask2former.evaluation.scoring import score_export

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu_start = time.process_time()
    start = time.perf_counter()
    metrics = score_export(pred, split, num_workers=workers)
    elapsed = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    num_images = metrics["num_real"] + metrics["num_fake"]
    print(json.dumps({
        "images": num_images, "workers": workers, "seconds": round(elapsed, 3),
        "images_per_s": round(num_images / elapsed, 1),
        # CPU time of all threads: what the run costs independently of other load
        "cpu_ms_per_image": round(1000 * cpu_seconds / num_images, 3),
        "peak_rss_mib_before": round(rss_before, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "f1": round(metrics["f1"], 4),
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="runs per (size, workers)")
    parser.add_argument("--out-json", help="also write all runs to this JSON file")
    parser.add_argument("--measure", nargs=3, metavar=("SPLIT", "PRED", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1], int(args.measure[2]))
        return
    runs = []
    root = tempfile.mkdtemp(prefix="bench_scoring_")
    try:
        for size in args.sizes:
            start = time.perf_counter()
            split, pred = generate(os.path.join(root, str(size)), size)
            print(f"generated {size} images in {time.perf_counter() - start:.1f} s", flush=True)
            for _ in range(args.repeats):
                for workers in args.workers:
                    done = subprocess.run([sys.executable, __file__, "--measure", split, pred,
                                           str(workers)], capture_output=True, text=True)
                    if done.returncode:
                        sys.exit(f"scoring failed:\n{done.stderr}")
                    run = json.loads(done.stdout.strip().splitlines()[-1])
                    runs.append(run)
                    print(f"{run['images']:>6} images, {workers} worker(s): "
                          f"{run['images_per_s']:7.1f} img/s ({run['seconds']:.2f} s, "
                          f"{run['cpu_ms_per_image']:.2f} CPU ms/img), peak RSS "
                          f"{run['peak_rss_mib']:.0f} MiB (after imports "
                          f"{run['peak_rss_mib_before']:.0f} MiB)", flush=True)
            shutil.rmtree(os.path.join(root, str(size)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(runs, f, indent=2)
        print(f"runs written to {args.out_json}")


if __name__ == "__main__":
    main()
