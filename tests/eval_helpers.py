"""Shared fixtures of the eval tests: a tiny DDL split on disk and fake model outputs."""
import json
import os

import cv2
import numpy as np
import torch


def write_split(root, num_real=6, num_fake=8, seed=0, sizes=((24, 32), (40, 28), (33, 33))):
    """A labeled split in DDL layout under ``root``; returns the test mapper's dicts.

    Image sizes cycle through ``sizes`` (H, W); fake masks are random rectangles (0/255), one
    of them empty so that the empty-mask convention is exercised.
    """
    rng = np.random.default_rng(seed)
    for folder in ("real", "fake", "masks"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    dicts = []
    for index in range(num_real + num_fake):
        label = int(index >= num_real)
        height, width = sizes[index % len(sizes)]
        name = f"{'fake' if label else 'real'}_{index:03d}.png"
        image_path = os.path.join(root, "fake" if label else "real", name)
        cv2.imwrite(image_path, rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        record = {"file_name": image_path, "image_id": name[:-4], "height": height,
                  "width": width, "label": label}
        if label:
            mask = np.zeros((height, width), np.uint8)
            if index != num_real:  # the first fake keeps an empty mask
                top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
                mask[top:top + rng.integers(3, height // 2), left:left + rng.integers(3, width // 2)] = 255
            record["mask_file"] = os.path.join(root, "masks", name)
            cv2.imwrite(record["mask_file"], mask)
        dicts.append(record)
    return dicts


def read_gt(record):
    return cv2.imread(record["mask_file"], cv2.IMREAD_GRAYSCALE) > 127


def make_outputs(dicts, seed=1, detection=True, localization=True):
    """Model-like outputs: scores with ties, probability maps correlated with the masks.

    Some probabilities are exactly 0.5 (not forged by the > 0.5 rule) and some are the next
    float32 above it, to pin the threshold.
    """
    rng = np.random.default_rng(seed)
    outputs = []
    for record in dicts:
        output = {}
        if detection:
            # rounding to tenths makes ties between real and fake images
            score = np.round(0.3 * record["label"] + 0.7 * rng.random(), 1)
            output["fake_prob"] = torch.tensor(score, dtype=torch.float32)
        if localization:
            height, width = record["height"], record["width"]
            gt = read_gt(record) if record["label"] == 1 else np.zeros((height, width), bool)
            prob = np.clip(0.45 * gt + 0.6 * rng.random((height, width)), 0, 1).astype(np.float32)
            prob[0, 0] = 0.5
            prob[0, 1] = np.nextafter(np.float32(0.5), np.float32(1))
            mask_prob = torch.from_numpy(prob)
            output["mask_prob"] = mask_prob
            output["mask"] = mask_prob > 0.5
        outputs.append(output)
    return outputs


def distributed_evaluate(split_root, export_dir, result_path, batch_size, group_key=None):
    """Body of a ``detectron2.engine.launch`` worker: evaluate this rank's share of images.

    Images are dealt out round-robin like detectron2's InferenceSampler would split them into
    contiguous chunks; either way every image is seen by exactly one process.
    """
    from detectron2.utils import comm

    from ddl_mask2former.evaluation import DDLEvaluator

    dicts = write_split_dicts(split_root)
    outputs = make_outputs(dicts)
    rank, world = comm.get_rank(), comm.get_world_size()
    evaluator = DDLEvaluator("eval_test", export_dir=export_dir, group_key=group_key)
    evaluator.reset()
    mine = list(range(rank, len(dicts), world))
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        evaluator.process([dicts[i] for i in chunk], [outputs[i] for i in chunk])
    results = evaluator.evaluate()
    with open(f"{result_path}.rank{rank}", "w") as f:
        f.write(str(len(mine)))
    if comm.is_main_process():
        with open(result_path, "w") as f:
            json.dump(results, f)


def write_split_dicts(split_root):
    """The dicts of a split written by ``write_split`` (re-read from disk, sorted by name)."""
    dicts = []
    for label, folder in ((0, "real"), (1, "fake")):
        for name in sorted(os.listdir(os.path.join(split_root, folder))):
            path = os.path.join(split_root, folder, name)
            height, width = cv2.imread(path).shape[:2]
            record = {"file_name": path, "image_id": name[:-4], "height": height,
                      "width": width, "label": label}
            if label:
                record["mask_file"] = os.path.join(split_root, "masks", name)
                record["forgery_type"] = "swap" if int(name[5:8]) % 2 else "edit"
            dicts.append(record)
    return dicts
