"""One image's ground truth for pixel scoring: read the mask, check its size, count TP/FP/FN.

The in-process evaluator, offline scoring and the ensemble weight search all go through here,
so they read, binarize and size-check ground truth the same way.
"""
from typing import Optional, Tuple

import numpy as np

from ..data.image_io import read_forgery_mask
from .metrics import mask_counts

__all__ = ["read_ground_truth", "count_against_ground_truth"]


def read_ground_truth(mask_path: Optional[str], size: Tuple[int, int], threshold: int = 127,
                      image_name: str = "") -> np.ndarray:
    """Forged pixels of one image as a bool (H, W) array; all False for a real image.

    Args:
        mask_path: the image's ground-truth mask, or None for a real image.
        size: (height, width) of the image at its original resolution.
        threshold: mask pixels above this 8-bit value are forged.
        image_name: the image, named in the error when the mask's size differs from ``size``.
    """
    size = (int(size[0]), int(size[1]))
    if mask_path is None:
        return np.zeros(size, dtype=bool)
    forged = read_forgery_mask(mask_path, threshold=threshold)
    if forged.shape != size:
        raise ValueError(f"{mask_path}: ground-truth mask is {forged.shape[0]}x{forged.shape[1]} "
                         f"but the image {image_name} is {size[0]}x{size[1]} (height x width)")
    return forged


def count_against_ground_truth(pred: np.ndarray, mask_path: Optional[str], threshold: int = 127,
                               image_name: str = "") -> Tuple[int, int, int]:
    """(TP, FP, FN) of a predicted bool mask against the image's ground truth.

    A real image (``mask_path`` None) has no forged pixel, so nothing is read and every pixel
    predicted forged is a false positive.
    """
    if mask_path is None:
        return 0, int(np.count_nonzero(pred)), 0
    return mask_counts(pred, read_ground_truth(mask_path, pred.shape, threshold, image_name))
