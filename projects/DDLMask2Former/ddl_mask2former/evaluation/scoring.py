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
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
from tqdm import tqdm

from ..data.ddl_dataset import load_ddl_split
from .conventions import best_threshold_f1, code_histograms, compute_conventions
from .export import (MASK_DIR, PREDICTION_FILE, PROB_DIR, mask_file_name, read_gray_png,
                     read_predictions)
from .ground_truth import count_against_ground_truth, read_ground_truth
from .metrics import compute_ddl_metrics_from_arrays, mask_counts

__all__ = [
    "SplitImage",
    "SplitIndex",
    "list_ddl_split",
    "score_export",
    "score_images",
    "ImageScores",
    "iter_bounded",
    "progress_bar",
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
    mask_path: Optional[str]  # ground-truth mask, fakes only
    height: int  # original size in display orientation
    width: int


class SplitIndex:
    """Compact listing of a labeled split in DDL layout: a name and a few bytes per image.

    Built from ``ddl_mask2former.data.load_ddl_split`` (sizes from file headers; a fake
    without a mask or a mask of the wrong size is an error naming the file), whose dicts are
    released one by one as they are read. ``index[i]`` gives a ``SplitImage``.
    """

    def __init__(self, split_dir: str):
        self.split_dir = split_dir
        dicts = load_ddl_split(split_dir)
        count = len(dicts)
        self.names: List[str] = [""] * count
        self.labels = np.empty(count, dtype=np.int8)
        self.sizes = np.empty((count, 2), dtype=np.int32)
        self.mask_dir: Optional[str] = None
        # mask file names that differ from their image's name (DDL masks share the name)
        self._other_mask_names: Dict[int, str] = {}
        for i in range(count):
            record, dicts[i] = dicts[i], None
            if "label" not in record:
                raise ValueError(f"{split_dir}: unlabeled split (no real/ and fake/ folders); "
                                 "scoring needs labels")
            name = os.path.basename(record["file_name"])
            self.names[i] = name
            self.labels[i] = record["label"]
            self.sizes[i] = (record["height"], record["width"])
            if record["label"] == 1:
                mask_dir, mask_name = os.path.split(record["mask_file"])
                self.mask_dir = self.mask_dir or mask_dir
                if mask_name != name:
                    self._other_mask_names[i] = mask_name
        self._check_unique_export_names()

    def _check_unique_export_names(self) -> None:
        seen: Dict[str, int] = {}
        for i, name in enumerate(self.names):
            key = mask_file_name(name)
            if key in seen:
                raise ValueError(f"{self.split_dir}: images {self.names[seen[key]]} and {name} "
                                 f"share the export name {key}; image names must be unique "
                                 "across real/ and fake/")
            seen[key] = i

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> SplitImage:
        name, label = self.names[i], int(self.labels[i])
        mask_path = (os.path.join(self.mask_dir, self._other_mask_names.get(i, name))
                     if label == 1 else None)
        return SplitImage(name, label, mask_path, int(self.sizes[i, 0]), int(self.sizes[i, 1]))

    def __iter__(self) -> Iterator[SplitImage]:
        return (self[i] for i in range(len(self)))


def list_ddl_split(split_dir: str) -> SplitIndex:
    """The images of a labeled split folder in DDL layout (see ``SplitIndex``)."""
    return SplitIndex(split_dir)


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


def progress_bar(iterable: Iterable, total: int, enabled: bool, description: str) -> Iterable:
    """``iterable`` with a tqdm bar on stderr when ``enabled``, else ``iterable`` itself."""
    if not enabled:
        return iterable
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


class ImageScores(NamedTuple):
    """Per-image results of scoring an export: what every metric of a split is computed from.

    One entry per image of ``images`` in its order. ``fake_prob`` is NaN without
    ``prediction.txt``; ``counts`` holds TP, FP, FN per image (-1 without ``mask/``);
    ``best_f1`` is the best-threshold F1 per fake image when ``prob/`` was read, else None.
    """

    images: SplitIndex
    fake_prob: np.ndarray
    counts: np.ndarray  # (N, 3) int64
    num_pixels: np.ndarray
    best_f1: Optional[np.ndarray]
    num_missing_scores: int
    num_missing_masks: int
    conventions: bool  # whether results() adds other papers' figures

    def metrics(self) -> Dict[str, float]:
        """``compute_ddl_metrics_from_arrays`` over all images (per group: ``breakdown``)."""
        return compute_ddl_metrics_from_arrays(
            self.images.labels, self.fake_prob, self.counts[:, 0], self.counts[:, 1],
            self.counts[:, 2], self.num_pixels, names=self.images.names)

    def results(self) -> Dict[str, float]:
        """What ``score_export`` returns (see there)."""
        results = self.metrics()
        results["num_missing_scores"] = self.num_missing_scores
        results["num_missing_masks"] = self.num_missing_masks
        if self.conventions:
            results["conventions"] = compute_conventions(
                self.images.labels, self.fake_prob, self.counts[:, 0], self.counts[:, 1],
                self.counts[:, 2], self.num_pixels, best_f1=self.best_f1)
        return results


def score_export(pred_dir: str, split_dir: str, *, allow_missing: bool = False,
                 gt_mask_threshold: int = 127, num_workers: Optional[int] = None,
                 progress: bool = False, conventions: bool = False) -> Dict[str, float]:
    """Score an export directory against a DDL split folder.

    Returns ``compute_ddl_metrics``'s dict (fractions) plus ``num_missing_scores`` and
    ``num_missing_masks``. With ``conventions``, also ``"conventions"``: other papers' figures
    (``conventions.compute_conventions``); the best-threshold F1 reads ``prob/`` when the
    export has it (a fake image without its map is then an error naming it). Detection is scored when ``prediction.txt`` exists, localization
    when ``mask/`` exists. Missing predictions raise unless ``allow_missing`` (then a missing
    score is 0 and a missing mask is empty); extra predictions, masks of the wrong size and
    malformed lines always raise, naming the image.
    """
    return score_images(pred_dir, split_dir, allow_missing=allow_missing,
                        gt_mask_threshold=gt_mask_threshold, num_workers=num_workers,
                        progress=progress, conventions=conventions).results()


def score_images(pred_dir: str, split: Union[str, SplitIndex], *, allow_missing: bool = False,
                 gt_mask_threshold: int = 127, num_workers: Optional[int] = None,
                 progress: bool = False, conventions: bool = False) -> ImageScores:
    """``score_export``'s per-image results (``ImageScores``), for metrics over subsets.

    ``split`` is a split folder or its ``list_ddl_split``; the other arguments and the errors
    are ``score_export``'s.
    """
    images = split if isinstance(split, SplitIndex) else list_ddl_split(split)
    prediction_path = os.path.join(pred_dir, PREDICTION_FILE)
    mask_dir = os.path.join(pred_dir, MASK_DIR)
    has_det = os.path.isfile(prediction_path)
    has_loc = os.path.isdir(mask_dir)
    if not (has_det or has_loc):
        raise FileNotFoundError(f"{pred_dir}: neither {PREDICTION_FILE} nor {MASK_DIR}/ found; "
                                "nothing to score")
    count = len(images)
    fake_prob = np.full(count, np.nan)
    num_missing_scores = 0
    if has_det:
        scores = read_predictions(prediction_path)
        num_missing_scores = len(_compare(images.names, scores, "scores", prediction_path,
                                          allow_missing))
        # a missing score counts as 0 ("certainly real") when allowed
        fake_prob[:] = [scores.get(name, 0.0) for name in images.names]
        del scores
    missing_masks = set()
    if has_loc:
        with os.scandir(mask_dir) as entries:
            found_masks = [e.name for e in entries if e.is_file()]
        missing_masks = set(_compare((mask_file_name(n) for n in images.names), found_masks,
                                     "masks", mask_dir, allow_missing))
        del found_masks

    prob_dir = os.path.join(pred_dir, PROB_DIR)
    read_prob = conventions and has_loc and os.path.isdir(prob_dir)

    def read_map(path: str, image: SplitImage, what: str) -> np.ndarray:
        values = read_gray_png(path)
        if values.shape != (image.height, image.width):
            raise ValueError(f"{path}: {what} is {values.shape[0]}x{values.shape[1]} but image "
                             f"{image.name} is {image.height}x{image.width} (height x width)")
        return values

    def score_image(i: int) -> Tuple[int, int, int, float]:
        image = images[i]
        size = (image.height, image.width)
        mask_name = mask_file_name(image.name)
        if mask_name in missing_masks:
            pred = np.zeros(size, dtype=bool)
        else:
            pred = read_map(os.path.join(mask_dir, mask_name), image, "mask") > PRED_MASK_THRESHOLD
        if image.mask_path is None:  # a real image: every marked pixel is a false positive
            return (*count_against_ground_truth(pred, None), float("nan"))
        forged = read_ground_truth(image.mask_path, size, gt_mask_threshold, image.name)
        best_f1 = float("nan")
        if read_prob:
            codes = (np.zeros(size, dtype=np.uint8) if mask_name in missing_masks
                     else read_map(os.path.join(prob_dir, mask_name), image, "probability map"))
            best_f1 = best_threshold_f1(*code_histograms(codes, forged))[0]
        return (*mask_counts(pred, forged), best_f1)

    # per image three counts (and a best F1) in preallocated arrays: memory stays flat
    counts = np.full((count, 3), -1, dtype=np.int64)
    best_f1 = np.full(count, np.nan)
    if has_loc:
        workers = num_workers or default_num_workers()
        for i, image_result in enumerate(progress_bar(
                iter_bounded(score_image, range(count), workers), count, progress, "scoring")):
            counts[i] = image_result[:3]
            best_f1[i] = image_result[3]
    num_pixels = images.sizes[:, 0].astype(np.int64) * images.sizes[:, 1]
    return ImageScores(images, fake_prob, counts, num_pixels, best_f1 if read_prob else None,
                       num_missing_scores, len(missing_masks), conventions)
