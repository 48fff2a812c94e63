"""Offline scoring of an export directory against a split folder in DDL layout.

The split folder holds ``real/*.png``, ``fake/*.png`` and ``masks/`` (or ``mask/``) with one
mask per fake image under the same file name. The export directory is what ``DDLEvaluator``
or ``tools/ensemble.py`` writes (see ``export.py``). Decoding runs on a thread pool with a
bounded queue, and only counts are kept per image, so memory does not grow with the split.
"""
import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from .export import MASK_DIR, PREDICTION_FILE, mask_file_name, read_gray_png, read_predictions
from .metrics import ImageRecord, compute_ddl_metrics, mask_counts

__all__ = [
    "SplitImage",
    "list_ddl_split",
    "score_export",
    "iter_bounded",
    "default_num_workers",
    "JSON_KEYS",
]

logger = logging.getLogger(__name__)

# keys tools/evaluate_predictions.py --json always writes (null when a task was not scored)
JSON_KEYS = ("auc", "f1", "iou", "score", "f1_pixel", "iou_pixel", "num_real", "num_fake")
# a predicted mask pixel is forged when its 8-bit value is above this (masks are 0/255)
PRED_MASK_THRESHOLD = 127


class SplitImage(NamedTuple):
    name: str  # file name, the key used in prediction.txt
    label: int  # 0 real, 1 fake
    image_path: str
    mask_path: Optional[str]  # ground-truth mask, fakes only
    height: int  # original size in display orientation
    width: int


def list_ddl_split(split_dir: str) -> List[SplitImage]:
    """Images of a labeled split folder in DDL layout, sorted by name.

    Indexed by ``ddl_mask2former.data.load_ddl_split`` (sizes from file headers; a fake
    without a mask or a mask of the wrong size is an error naming the file).
    """
    from ..data.ddl_dataset import load_ddl_split

    images = []
    for record in load_ddl_split(split_dir):
        if "label" not in record:
            raise ValueError(f"{split_dir}: unlabeled split (no real/ and fake/ folders); "
                             "scoring needs labels")
        images.append(SplitImage(os.path.basename(record["file_name"]), record["label"],
                                 record["file_name"], record.get("mask_file"),
                                 record["height"], record["width"]))
    images.sort()
    _check_unique_export_names(images, split_dir)
    return images


def _check_unique_export_names(images: List[SplitImage], where: str) -> None:
    seen: Dict[str, str] = {}
    for image in images:
        key = mask_file_name(image.name)
        if key in seen:
            raise ValueError(f"{where}: {image.image_path} and {seen[key]} share the export name "
                             f"{key}; image names must be unique across real/ and fake/")
        seen[key] = image.image_path


def default_num_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def iter_bounded(function: Callable, items: Iterable, num_workers: int,
                 window: int = 64) -> Iterator:
    """``map(function, items)`` on a thread pool, in order, with at most ``window`` in flight."""
    if num_workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="ddl-score") as pool:
        pending = deque()
        for item in items:
            if len(pending) >= window:
                yield pending.popleft().result()
            pending.append(pool.submit(function, item))
        while pending:
            yield pending.popleft().result()


def _progress(iterable, total: int, enabled: bool, description: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, unit="img", file=sys.stderr,
                mininterval=1.0)


def _compare(expected: Iterable[str], found: Iterable[str], what: str, where: str,
             allow_missing: bool) -> List[str]:
    """Names expected but not found; raises on extras, and on missing unless allowed."""
    expected, found = set(expected), set(found)
    extra = sorted(found - expected)
    missing = sorted(expected - found)
    if extra:
        raise ValueError(f"{where}: {len(extra)} {what} for images not in the split, e.g. "
                         f"{', '.join(extra[:5])}")
    if missing and not allow_missing:
        raise ValueError(f"{where}: {len(missing)} images have no {what}, e.g. "
                         f"{', '.join(missing[:5])} (--allow-missing scores them as 0 / empty)")
    return missing


def score_export(pred_dir: str, split_dir: str, *, allow_missing: bool = False,
                 gt_mask_threshold: int = 127, num_workers: Optional[int] = None,
                 progress: bool = False) -> Dict[str, float]:
    """Score an export directory against a DDL split folder.

    Returns ``compute_ddl_metrics``'s dict (fractions) plus ``num_missing_scores`` and
    ``num_missing_masks``. Detection is scored when ``prediction.txt`` exists, localization
    when ``mask/`` exists. Missing predictions raise unless ``allow_missing`` (then a missing
    score is 0 and a missing mask is empty); extra predictions, masks of the wrong size and
    malformed lines always raise, naming the image.
    """
    from ..data.image_io import read_forgery_mask

    images = list_ddl_split(split_dir)
    prediction_path = os.path.join(pred_dir, PREDICTION_FILE)
    mask_dir = os.path.join(pred_dir, MASK_DIR)
    has_det = os.path.isfile(prediction_path)
    has_loc = os.path.isdir(mask_dir)
    if not (has_det or has_loc):
        raise FileNotFoundError(f"{pred_dir}: neither {PREDICTION_FILE} nor {MASK_DIR}/ found; "
                                "nothing to score")
    scores: Dict[str, float] = {}
    missing_scores: List[str] = []
    if has_det:
        scores = read_predictions(prediction_path)
        missing_scores = _compare((i.name for i in images), scores, "scores", prediction_path,
                                  allow_missing)
    missing_masks = set()
    if has_loc:
        with os.scandir(mask_dir) as entries:
            found_masks = [e.name for e in entries if e.is_file()]
        missing_masks = set(_compare((mask_file_name(i.name) for i in images), found_masks,
                                     "masks", mask_dir, allow_missing))

    def score_image(image: SplitImage) -> ImageRecord:
        fake_prob = scores.get(image.name, 0.0) if has_det else float("nan")
        if not has_loc:
            return ImageRecord(image.name, image.label, fake_prob, -1, -1, -1, 0)
        mask_name = mask_file_name(image.name)
        size = (image.height, image.width)
        gt = None
        if image.label == 1:
            gt = read_forgery_mask(image.mask_path, threshold=gt_mask_threshold)
            if gt.shape != size:
                raise ValueError(f"{image.mask_path}: ground-truth mask is {gt.shape} but image "
                                 f"{image.name} is {size} (H, W)")
        if mask_name in missing_masks:
            pred = np.zeros(size, dtype=bool)
        else:
            pred_path = os.path.join(mask_dir, mask_name)
            pred = read_gray_png(pred_path) > PRED_MASK_THRESHOLD
            if pred.shape != size:
                raise ValueError(f"{pred_path}: mask is {pred.shape[0]}x{pred.shape[1]} but "
                                 f"image {image.name} is {size[0]}x{size[1]} (height x width)")
        if gt is None:
            return ImageRecord(image.name, 0, fake_prob, 0, int(np.count_nonzero(pred)), 0,
                               pred.size)
        tp, fp, fn = mask_counts(pred, gt)
        return ImageRecord(image.name, 1, fake_prob, tp, fp, fn, pred.size)

    workers = num_workers or default_num_workers()
    # a detection-only export needs no decoding: no threads
    records = list(_progress(iter_bounded(score_image, images, workers if has_loc else 1),
                             len(images), progress, "scoring"))
    results = compute_ddl_metrics(records)
    results["num_missing_scores"] = len(missing_scores)
    results["num_missing_masks"] = len(missing_masks)
    return results
