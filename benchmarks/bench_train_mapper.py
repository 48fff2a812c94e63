#!/usr/bin/env python
"""What one training sample costs a data-loader worker, by step, at DDL-like image sizes.

    python benchmarks/bench_train_mapper.py                                  # paper config, 3 sizes
    python benchmarks/bench_train_mapper.py --sizes 1920x1080 --samples 40 --json out.json

A loader worker decodes the PNG image and its mask, resizes the image to the base scale times a
random ratio, crops 512x512, flips, distorts colours and pads. This script writes one image and
mask pair per size (photo-like content: a smooth picture with pixel noise, so the PNG is about as
hard to decode as a photo's; a forged ellipse on ~10 % of the image), then times in one process
and one thread, as a worker runs:

* ``decode image``, ``decode mask``: ``read_image`` and ``read_forgery_mask``;
* ``augment``: the config's training augmentations on the decoded arrays, for the mapper as
  built (resize and crop in one step, ``BaseScaleResizeCrop``) and for the same augmentations
  with the resize and crop as two steps (the whole image resampled, then cropped);
* ``sample``: the whole mapper call (decoding included), both variants.

Both variants draw the same random numbers per sample (same ratio, window, flip), and they
alternate, so machine noise falls on both alike; their masks must be equal, and the share of
image pixels that differ (resampling rounding) is printed. The last columns turn the sample time into
images per second per worker and the workers a ``--target`` images per second needs.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, add_json_argument, write_json
sys.path.insert(0, str(ROOT / "projects" / "DDLMask2Former"))


def write_sample(folder, width, height, seed=0):
    """A photo-like PNG of width x height and its forgery mask (an ellipse); returns the dataset dict."""
    import cv2
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image.astype(np.int16) + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width // 2, height // 3), (width // 8, height // 4), 0, 0, 360, 255, -1)
    image_path = os.path.join(folder, f"{width}x{height}.png")
    mask_path = os.path.join(folder, f"{width}x{height}_mask.png")
    Image.fromarray(image).save(image_path)
    Image.fromarray(mask).save(mask_path)
    return {"file_name": image_path, "mask_file": mask_path, "label": 1, "height": height,
            "width": width, "image_id": f"{width}x{height}"}


def two_step(augmentations):
    """The same augmentations with every BaseScaleResizeCrop split into its resize and its crop."""
    from ddl_mask2former.data.augmentations import BaseScaleResizeCrop

    split = []
    for augmentation in augmentations:
        split.extend([augmentation.resize, augmentation.crop]
                     if isinstance(augmentation, BaseScaleResizeCrop) else [augmentation])
    return split


def median_ms(values):
    return round(1000 * statistics.median(values), 2)


def measure(record, mappers, samples):
    import numpy as np
    from detectron2.data import transforms as T

    from ddl_mask2former.data import read_forgery_mask, read_image

    times = {"decode image": [], "decode mask": []}
    for name in mappers:
        times[f"augment, {name}"] = []
        times[f"sample, {name}"] = []
    differing, max_difference = [], 0
    for index in range(samples + 1):  # the first round warms caches and is dropped
        start = time.perf_counter()
        image = read_image(record["file_name"])
        decoded = time.perf_counter()
        mask = read_forgery_mask(record["mask_file"]).astype(np.uint8)
        rounds = {"decode image": decoded - start, "decode mask": time.perf_counter() - decoded}
        augmented = []
        for name, mapper in mappers.items():
            np.random.seed(index)
            aug_input = T.AugInput(image, sem_seg=mask)
            start = time.perf_counter()
            mapper.augmentations(aug_input)
            rounds[f"augment, {name}"] = time.perf_counter() - start
            augmented.append(aug_input)
            np.random.seed(index)
            start = time.perf_counter()
            mapper(record)
            rounds[f"sample, {name}"] = time.perf_counter() - start
        if index:
            for key, value in rounds.items():
                times[key].append(value)
        # Same random numbers, so the same window: the outputs differ only by resampling rounding.
        first, second = augmented[0], augmented[-1]
        if not np.array_equal(first.sem_seg, second.sem_seg):
            raise AssertionError(f"sample {index}: the masks of {list(mappers)} differ")
        difference = np.abs(first.image.astype(np.int16) - second.image)
        differing.append(float((difference > 0).mean()))
        max_difference = max(max_difference, int(difference.max()))
    result = {key: median_ms(values) for key, values in times.items()}
    result["image pixels differing, mean %"] = round(100 * statistics.fmean(differing), 3)
    result["image pixels differing, max gray levels"] = max_difference
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ddl-i" / "ddl_mask2former_swin_tiny.yaml")
    parser.add_argument("--sizes", nargs="+", default=["1024x768", "1920x1080", "2048x1536"],
                        help="image sizes, WIDTHxHEIGHT")
    parser.add_argument("--samples", type=int, default=24, help="timed samples per size (random ratios and windows)")
    parser.add_argument("--target", type=float, default=100.0, help="images per second the loader must deliver")
    add_json_argument(parser)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2
    import torch
    from detectron2.config import get_cfg

    from ddl_mask2former import add_ddl_mask2former_config
    from ddl_mask2former.data import DDLDatasetMapper

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file(str(args.config))
    fused = DDLDatasetMapper(cfg, is_train=True)
    arguments = DDLDatasetMapper.from_config(cfg, is_train=True)
    arguments["augmentations"] = two_step(arguments["augmentations"])
    mappers = {"one step": fused, "two steps": DDLDatasetMapper(**arguments)}
    print(f"{args.config.relative_to(ROOT)}: crop {tuple(cfg.INPUT.CROP.SIZE)}, base scale "
          f"{tuple(cfg.INPUT.BASE_SCALE)} x ratio {tuple(cfg.INPUT.RATIO_RANGE)}, photometric "
          f"{cfg.INPUT.PHOTOMETRIC.ENABLED}; {args.samples} samples per size, one thread; ms are medians",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddl_train_mapper_") as folder:
        for size in args.sizes:
            width, height = (int(v) for v in size.lower().split("x"))
            record = write_sample(folder, width, height)
            row = {"size": f"{width}x{height}", "png_mib": round(os.path.getsize(record["file_name"]) / 2**20, 2),
                   **measure(record, mappers, args.samples)}
            for name in mappers:
                per_worker = 1000 / row[f"sample, {name}"]
                row[f"img/s per worker, {name}"] = round(per_worker, 2)
                row[f"workers for {args.target:g} img/s, {name}"] = round(args.target / per_worker, 1)
            row["sample ratio one/two steps"] = round(row["sample, one step"] / row["sample, two steps"], 3)
            rows.append(row)
            print(f"{row['size']} ({row['png_mib']} MiB PNG): decode image {row['decode image']} ms, mask "
                  f"{row['decode mask']} ms; augment {row['augment, one step']} ms in one step vs "
                  f"{row['augment, two steps']} in two; sample {row['sample, one step']} vs "
                  f"{row['sample, two steps']} ms (ratio {row['sample ratio one/two steps']}); "
                  f"{row['img/s per worker, one step']} img/s per worker, "
                  f"{row[f'workers for {args.target:g} img/s, one step']} workers for {args.target:g} img/s; "
                  f"masks equal, {row['image pixels differing, mean %']} % of image pixels differ (at most "
                  f"{row['image pixels differing, max gray levels']} gray levels)", flush=True)
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
