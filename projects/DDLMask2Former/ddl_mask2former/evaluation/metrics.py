"""Streaming DDL metrics: detection AUC, localization F1/IoU, overall score.

Everything here works on per-image scalars (``ImageRecord``), never on masks, so memory grows
only by a few numbers per image and results do not depend on the order images arrive in.

Conventions (the official scorer is not public; these are the ones DESIGN.md fixes):

- Detection: ROC AUC of ``fake_prob`` over all labeled images. Tied scores count one half,
  exactly as ``sklearn.metrics.roc_auc_score`` does. With one class only, AUC is NaN (warning).
- Localization (fake images only), predicted mask = probability > 0.5:
  per image ``F1 = 2TP / (2TP + FP + FN)`` and ``IoU = TP / (TP + FP + FN)``, averaged over fake
  images (headline). An empty prediction on a non-empty mask scores 0; an empty prediction on
  an empty mask scores 1 (nothing to find, nothing claimed). The ``*_pixel`` variants apply the
  same formulas to TP/FP/FN summed over the dataset.
- On real images: ``real_forged_frac`` = predicted-forged pixels / all pixels, summed over reals;
  ``real_false_alarm`` = share of real images with more than ``FALSE_ALARM_AREA`` (1 %) of their
  pixels predicted forged (what a user sees as "a real photo with a region marked").
- Overall score = (AUC + F1 + IoU) / 3, with the per-image F1 and IoU.
- Per group (``TEST.EVAL_GROUP_KEY`` in the evaluator, ``--by`` offline): ``group_images``
  chooses each group's images, by one rule for both, and the same formulas score them.
"""
import math
import warnings
from collections import defaultdict
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from tabulate import tabulate

__all__ = [
    "ImageRecord",
    "roc_auc",
    "mask_counts",
    "f1_from_counts",
    "iou_from_counts",
    "compute_ddl_metrics",
    "compute_ddl_metrics_from_arrays",
    "compute_group_metrics",
    "compute_group_metrics_from_arrays",
    "group_images",
    "ImageGroup",
    "NO_GROUP",
    "GROUP_RULE",
    "VS_ALL_REALS_NOTE",
    "LABEL_UNKNOWN",
    "FALSE_ALARM_AREA",
]

# label of an image without ground truth (unlabeled test split): exported, never scored
LABEL_UNKNOWN = -1
# A real image with more than this share of its pixels predicted forged is a false alarm.
FALSE_ALARM_AREA = 0.01
# the group of the images without a value for a breakdown's key
NO_GROUP = "(none)"
# entries about real images: a group scored against all reals would repeat the overall ones
_REAL_IMAGE_KEYS = ("real_forged_frac", "real_false_alarm")
# the footnote of a table whose AUC marked * is a group's fakes against all reals
VS_ALL_REALS_NOTE = "* a group without real images: AUC of its fakes against all reals (#real)"
# group_images' rule in a sentence, for the tools that print groups
GROUP_RULE = (f"a group holds the images with that value (a fake with several values counts in "
              f"each), {NO_GROUP} those without one; real images are grouped only if some have a "
              "value, and a group without real images of its own is scored with all of them "
              "(AUC marked *)")
# an image's value of a breakdown key: one value, several (it counts in each) or none
GroupValue = Union[None, str, Sequence[str]]


class ImageRecord(NamedTuple):
    """What the evaluator keeps per image: a name, the label and a handful of counts.

    ``fake_prob`` is NaN when the detection branch is off; ``tp``/``fp``/``fn`` are -1 when the
    localization branch is off. For real images ``tp == fn == 0`` and ``fp`` is the number of
    pixels predicted forged. ``num_pixels`` is height * width at the original resolution.
    """

    name: str
    label: int
    fake_prob: float
    tp: int
    fp: int
    fn: int
    num_pixels: int
    group: GroupValue = None  # the image's value of TEST.EVAL_GROUP_KEY (group_images)
    # The detection head's probability before the verdict (NaN: none); exports write it for
    # ensembles, which fuse the members' raw evidence.
    head_prob: float = math.nan

    @property
    def has_detection(self) -> bool:
        return not math.isnan(self.fake_prob)

    @property
    def has_localization(self) -> bool:
        return self.tp >= 0


def roc_auc(labels: Sequence[int], scores: Sequence[float], warn: bool = True) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (1 = positive), ties counted one half.

    Computed exactly as the normalized Mann-Whitney U statistic in integer arithmetic, which is
    the quantity ``sklearn.metrics.roc_auc_score`` approximates with the trapezoid rule (the two
    agree to floating-point rounding, ties included). Returns NaN, with a warning when ``warn``,
    if only one class is present.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"roc_auc needs two 1-D arrays of equal length, got shapes {labels.shape} and "
            f"{scores.shape}"
        )
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"roc_auc labels must be 0 or 1, got values {np.unique(labels)[:10]}")
    if not np.isfinite(scores).all():
        raise ValueError("roc_auc scores must be finite; found NaN or inf")
    num_pos = int(np.count_nonzero(labels == 1))
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0:
        if warn:
            warnings.warn(
                f"AUC is undefined with only one class present ({num_pos} fake, {num_neg} real "
                "images); reporting NaN",
                RuntimeWarning,
                stacklevel=2,
            )
        return float("nan")
    # per distinct score value: how many positives and negatives share it
    distinct_values, value_index = np.unique(scores, return_inverse=True)
    num_values = distinct_values.size
    pos_per_value = np.bincount(value_index[labels == 1], minlength=num_values)
    neg_per_value = np.bincount(value_index[labels == 0], minlength=num_values)
    neg_below = np.cumsum(neg_per_value) - neg_per_value
    # twice the Mann-Whitney U: a positive above a negative counts 2, a tie counts 1
    twice_u = int(np.dot(pos_per_value.astype(np.int64), 2 * neg_below + neg_per_value))
    return twice_u / (2 * num_pos * num_neg)


def mask_counts(pred: np.ndarray, gt: np.ndarray) -> Tuple[int, int, int]:
    """(TP, FP, FN) pixel counts of two boolean masks of the same shape."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    pred_pos = int(np.count_nonzero(pred))
    gt_pos = int(np.count_nonzero(gt))
    tp = int(np.count_nonzero(np.logical_and(pred, gt)))
    return tp, pred_pos - tp, gt_pos - tp


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """Pixel F1 = 2TP / (2TP + FP + FN); 1.0 when prediction and ground truth are both empty."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2 * tp / denominator


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """Pixel IoU = TP / (TP + FP + FN); 1.0 when prediction and ground truth are both empty."""
    denominator = tp + fp + fn
    return 1.0 if denominator == 0 else tp / denominator


def _mean(values: np.ndarray) -> float:
    # fsum makes the mean independent of the order images arrive in (1 vs N processes)
    return math.fsum(values.tolist()) / values.size if values.size else float("nan")


def _per_image(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator per image, 1.0 where both masks are empty (denominator 0)."""
    ratio = np.ones(denominator.shape, dtype=np.float64)
    nonzero = denominator > 0
    ratio[nonzero] = numerator[nonzero] / denominator[nonzero]
    return ratio


def compute_ddl_metrics(records: Iterable[ImageRecord], warn: bool = True) -> Dict[str, float]:
    """Metrics of a set of records, as fractions in [0, 1].

    Keys: ``num_real``, ``num_fake``, ``num_unlabeled`` always; ``auc`` when any record has a
    detection score; ``f1``, ``iou``, ``f1_pixel``, ``iou_pixel``, ``real_forged_frac``, ``real_false_alarm`` when any
    record has localization counts; ``score`` when both tasks are present. Unlabeled records
    (label -1) are counted but not scored. Raises if only some records carry a task.
    """
    records = list(records)
    return compute_ddl_metrics_from_arrays(*_record_columns(records),
                                           names=[r.name for r in records], warn=warn)


def _record_columns(records: List[ImageRecord]) -> List[np.ndarray]:
    """label, fake_prob, tp, fp, fn, num_pixels of the records, one float64 array each."""
    columns = np.asarray([r[1:7] for r in records], dtype=np.float64).reshape(-1, 6)
    return [columns[:, i] for i in range(6)]


def compute_ddl_metrics_from_arrays(labels, fake_prob, tp, fp, fn, num_pixels, names=None,
                                    warn: bool = True) -> Dict[str, float]:
    """``compute_ddl_metrics`` on one array per ``ImageRecord`` field (the scorer's form).

    Counts may be float64 arrays: they are exact integers far below 2**53.
    """
    labels = np.asarray(labels).astype(np.int64)
    fake_prob = np.asarray(fake_prob, dtype=np.float64)
    tp, fp, fn, num_pixels = (np.asarray(a, dtype=np.int64) for a in (tp, fp, fn, num_pixels))
    labeled = labels != LABEL_UNKNOWN
    fake = labels == 1
    real = labels == 0
    results: Dict[str, float] = {
        "num_real": int(real.sum()),
        "num_fake": int(fake.sum()),
        "num_unlabeled": int((~labeled).sum()),
    }
    has_det = _task_present(~np.isnan(fake_prob), labeled, names, "a detection score (fake_prob)")
    has_loc = _task_present(tp >= 0, labeled, names, "localization counts (a mask)")
    if has_det:
        results["auc"] = roc_auc(labels[labeled], fake_prob[labeled], warn=warn)
    if has_loc:
        tp_fake, fp_fake, fn_fake = tp[fake], fp[fake], fn[fake]
        results["f1"] = _mean(_per_image(2 * tp_fake, 2 * tp_fake + fp_fake + fn_fake))
        results["iou"] = _mean(_per_image(tp_fake, tp_fake + fp_fake + fn_fake))
        total_tp, total_fp, total_fn = (int(a.sum()) for a in (tp_fake, fp_fake, fn_fake))
        has_fakes = results["num_fake"] > 0
        results["f1_pixel"] = (f1_from_counts(total_tp, total_fp, total_fn) if has_fakes
                               else float("nan"))
        results["iou_pixel"] = (iou_from_counts(total_tp, total_fp, total_fn) if has_fakes
                                else float("nan"))
        real_pixels = int(num_pixels[real].sum())
        results["real_forged_frac"] = (int(fp[real].sum()) / real_pixels if real_pixels
                                       else float("nan"))
        results["real_false_alarm"] = (
            float(np.mean(fp[real] > FALSE_ALARM_AREA * num_pixels[real])) if real.any() else float("nan"))
    if has_det and has_loc:
        results["score"] = (results["auc"] + results["f1"] + results["iou"]) / 3
    return results


def _task_present(present: np.ndarray, labeled: np.ndarray, names, what: str) -> bool:
    present = present[labeled]
    count = int(present.sum())
    if 0 < count < present.size:
        example = ""
        if names is not None:
            example = f" (e.g. {np.asarray(names, dtype=object)[labeled][~present][0]})"
        raise ValueError(
            f"{count} of {present.size} labeled images have {what} but others do not{example}; "
            "every image must come from the same model configuration"
        )
    return count > 0


class ImageGroup(NamedTuple):
    """One group of a breakdown: the images scored for it (indices) and how they were chosen."""

    indices: np.ndarray  # int64, ascending
    # True: the group has no real image of its own; ``indices`` add all real images
    vs_all_reals: bool


def _value_list(value: GroupValue) -> List[str]:
    """An image's group values as sorted distinct strings; [] when it has none."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted({str(item) for item in value if item is not None})
    return [str(value)]


def group_images(values: Sequence[GroupValue], labels: Sequence[int]) -> Dict[str, ImageGroup]:
    """The images of each group, by the one rule of every DDL breakdown.

    ``values[i]`` is image i's value of the key: one value, a list of them (the image counts
    in each group) or None. Images without a value form the group ``NO_GROUP``, last; the
    others come in sorted order. Unlabeled images are in no group. When no real image has a
    value (the key describes the forgery, e.g. a forgery type, which real images lack), real
    images are not grouped at all. A group without real images of its own is scored as its
    fakes plus all real images of the set (``vs_all_reals``).
    """
    labels = np.asarray(labels)
    if len(values) != labels.size:
        raise ValueError(f"{len(values)} group values for {labels.size} images")
    image_values = [_value_list(value) for value in values]
    real = np.flatnonzero(labels == 0)
    group_reals = any(image_values[index] for index in real)
    members: Dict[str, List[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        if label == LABEL_UNKNOWN or (label == 0 and not group_reals):
            continue
        for value in image_values[index] or [NO_GROUP]:
            members[value].append(index)
    groups = {}
    for group in sorted(members, key=lambda name: (name == NO_GROUP, name)):
        indices = np.asarray(members[group], dtype=np.int64)
        vs_all_reals = bool(real.size) and not np.any(labels[indices] == 0)
        if vs_all_reals:
            indices = np.sort(np.concatenate([indices, real]))
        groups[group] = ImageGroup(indices, vs_all_reals)
    return groups


def compute_group_metrics_from_arrays(values: Sequence[GroupValue], labels, fake_prob, tp, fp,
                                      fn, num_pixels,
                                      names=None) -> Dict[str, Dict[str, float]]:
    """{group: metrics} of ``group_images(values, labels)``, each with the overall formulas.

    The arrays are ``compute_ddl_metrics_from_arrays``'s. A ``vs_all_reals`` group counts all
    real images in ``num_real`` and its AUC is its fakes against them; its entries about real
    images (``real_forged_frac``, ``real_false_alarm``) are left out, as they would repeat the
    overall ones. With a detection score, ``auc_vs_all_reals`` is 1.0 for such a group, else
    0.0. ``num_unlabeled`` is left out (unlabeled images are in no group).
    """
    columns = [np.asarray(column) for column in (labels, fake_prob, tp, fp, fn, num_pixels)]
    breakdown = {}
    for group, (indices, vs_all_reals) in group_images(values, columns[0]).items():
        group_names = None if names is None else [names[i] for i in indices]
        metrics = compute_ddl_metrics_from_arrays(*(column[indices] for column in columns),
                                                  names=group_names, warn=False)
        del metrics["num_unlabeled"]
        if vs_all_reals:
            for entry in _REAL_IMAGE_KEYS:
                metrics.pop(entry, None)
        if "auc" in metrics:
            metrics["auc_vs_all_reals"] = float(vs_all_reals)
        breakdown[group] = metrics
    return breakdown


def compute_group_metrics(records: Iterable[ImageRecord]) -> Dict[str, Dict[str, float]]:
    """``compute_group_metrics_from_arrays`` of records grouped by their ``group`` field."""
    records = list(records)
    return compute_group_metrics_from_arrays([r.group for r in records],
                                             *_record_columns(records),
                                             names=[r.name for r in records])


# metric key -> table header; fractions are printed in percent, counts as integers
_TABLE_COLUMNS = (
    ("auc", "AUC"), ("f1", "F1"), ("iou", "IoU"), ("score", "score"),
    ("f1_pixel", "F1 (pixel)"), ("iou_pixel", "IoU (pixel)"),
    ("real_forged_frac", "real forged px"), ("real_false_alarm", "real >1% marked"),
    ("num_real", "#real"), ("num_fake", "#fake"),
)
_COUNT_KEYS = ("num_real", "num_fake")


def format_metrics_table(metrics: Dict[str, float],
                         groups: Optional[Dict[str, Dict[str, float]]] = None) -> str:
    """A text table of ``compute_ddl_metrics`` output in percent, one row per group."""
    rows = [("all", metrics)] + list((groups or {}).items())
    columns = [(key, header) for key, header in _TABLE_COLUMNS
               if any(key in row for _, row in rows)]

    def cell(row, key):
        if key not in row:
            return ""
        if key in _COUNT_KEYS:
            return str(int(row[key]))
        text = f"{100 * row[key]:.2f}"
        return text + "*" if key == "auc" and row.get("auc_vs_all_reals") else text

    table = tabulate([[name] + [cell(row, key) for key, _ in columns] for name, row in rows],
                     headers=["subset"] + [header for _, header in columns], tablefmt="pipe",
                     disable_numparse=True,
                     stralign="right")
    if any(row.get("auc_vs_all_reals") for _, row in rows):
        table += "\n" + VS_ALL_REALS_NOTE
    return table
