"""Shared helpers of the data tests: tiny DDL-layout trees written with Pillow."""
import os

import numpy as np
from PIL import Image


def write_image(path, array, **save_kwargs):
    """Save a uint8 array (HxW or HxWx3) with Pillow, creating folders; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path, **save_kwargs)
    return path


def random_rgb(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask(height, width, box):
    """0/255 mask with the (y0, y1, x0, x1) box forged."""
    mask = np.zeros((height, width), np.uint8)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = 255
    return mask


def make_labeled_split(split_dir, num_real=3, num_fake=3, mask_folder="masks", seed=0,
                       sizes=((20, 30), (33, 17), (25, 25))):
    """Write real/, fake/ and <mask_folder>/ with tiny PNGs; returns {name: (label, (h, w))}."""
    rng = np.random.default_rng(seed)
    expected = {}
    for index in range(num_real + num_fake):
        label = int(index >= num_real)
        height, width = sizes[index % len(sizes)]
        name = f"img_{index:03d}.png"
        folder = "fake" if label else "real"
        write_image(os.path.join(split_dir, folder, name), random_rgb(rng, height, width))
        if label:
            write_image(os.path.join(split_dir, mask_folder, name),
                        box_mask(height, width, (2, height // 2, 3, width // 2)))
        expected[f"{folder}/{name}"] = (label, (height, width))
    return expected


def make_flat_split(split_dir, num_images=4, seed=0):
    rng = np.random.default_rng(seed)
    names = []
    for index in range(num_images):
        name = f"test_{index:03d}.png"
        write_image(os.path.join(split_dir, name), random_rgb(rng, 16 + index, 20))
        names.append(name)
    return names
