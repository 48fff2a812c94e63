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

from _common import add_json_argument, require_package, write_json

require_package()

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


def add_prob_export(root, split, name, seed):
    """A second kind of export for the ensemble timing: prediction.txt, prob/ and mask/."""
    from ddl_mask2former.evaluation.export import encode_prob_u8

    rng = np.random.default_rng(seed)
    export = os.path.join(root, name)
    os.makedirs(os.path.join(export, "prob"), exist_ok=True)
    os.makedirs(os.path.join(export, "mask"), exist_ok=True)
    pool = []
    for _ in range(POOL):
        # a soft blob: smooth probabilities, like a model's mask_prob
        blob = cv2.GaussianBlur(_ellipse_mask(rng).astype(np.float32) / 255, (31, 31), 8)
        codes = encode_prob_u8(np.clip(blob, 0, 1))
        pool.append((cv2.imencode(".png", codes)[1].tobytes(),
                     cv2.imencode(".png", np.where(codes >= 128, 255, 0).astype(np.uint8))[1]
                     .tobytes()))
    names = sorted(os.listdir(os.path.join(split, "real")) + os.listdir(os.path.join(split, "fake")))
    lines = []
    for index, image_name in enumerate(names):
        prob_png, mask_png = pool[index % POOL]
        with open(os.path.join(export, "prob", image_name), "wb") as f:
            f.write(prob_png)
        with open(os.path.join(export, "mask", image_name), "wb") as f:
            f.write(mask_png)
        lines.append(f"{image_name},{rng.random()!r}\n")
    with open(os.path.join(export, "prediction.txt"), "w") as f:
        f.writelines(lines)
    return export


def measure_ensemble(root, num_images, workers, step):
    """Time fuse_exports and search_weights on two generated exports; print one JSON line."""
    from ddl_mask2former.evaluation.fusion import fuse_exports, search_weights, weight_grid

    split, _ = generate(root, num_images)
    inputs = [add_prob_export(root, split, f"model_{i}", seed=10 + i) for i in range(2)]
    start = time.perf_counter()
    fuse_exports(inputs, os.path.join(root, "fused"), det_weights=[1, 2.5], loc_weights=[1, 1],
                 num_workers=workers)
    fuse_seconds = time.perf_counter() - start
    start = time.perf_counter()
    search_weights(inputs, split, step=step, num_workers=workers)
    search_seconds = time.perf_counter() - start
    print(json.dumps({
        "images": num_images, "workers": workers,
        "fuse_images_per_s": round(num_images / fuse_seconds, 1),
        "search_grid_points": len(weight_grid(2, step)),
        "search_images_per_s": round(num_images / search_seconds, 1),
    }))


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
    add_json_argument(parser, "--out-json")
    parser.add_argument("--ensemble", type=int, metavar="N",
                        help="instead: time tools/ensemble.py's fusion and weight search on N "
                             "images of two generated exports (first --workers value)")
    parser.add_argument("--search-step", type=float, default=0.1,
                        help="grid step of the timed weight search (default 0.1: 11 points)")
    parser.add_argument("--measure", nargs=3, metavar=("SPLIT", "PRED", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1], int(args.measure[2]))
        return
    if args.ensemble:
        root = tempfile.mkdtemp(prefix="bench_ensemble_")
        try:
            measure_ensemble(root, args.ensemble, args.workers[0], args.search_step)
        finally:
            shutil.rmtree(root, ignore_errors=True)
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
    write_json(args.out_json, runs)


if __name__ == "__main__":
    main()
