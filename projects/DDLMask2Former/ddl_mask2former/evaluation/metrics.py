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
"""
import math
import warnings
from collections import defaultdict
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

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
    "LABEL_UNKNOWN",
    "FALSE_ALARM_AREA",
]

# label of an image without ground truth (unlabeled test split): exported, never scored
LABEL_UNKNOWN = -1
# A real image with more than this share of its pixels predicted forged is a false alarm.
FALSE_ALARM_AREA = 0.01


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
    group: Optional[str] = None
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
    columns = np.asarray([r[1:7] for r in records], dtype=np.float64).reshape(-1, 6)
    return compute_ddl_metrics_from_arrays(
        columns[:, 0], columns[:, 1], columns[:, 2], columns[:, 3], columns[:, 4],
        columns[:, 5], names=[r.name for r in records], warn=warn)


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


def compute_group_metrics(records: Iterable[ImageRecord]) -> Dict[str, Dict[str, float]]:
    """Metrics per ``group`` (records without a group are left out of the breakdown).

    A group holding both classes gets its own AUC. A group holding only fakes (the usual case
    for a forgery-type key, which real images lack) is scored against ALL real images of the
    dataset, so its AUC says how well that forgery type is told apart from real images; the
    ``auc_vs_all_reals`` entry is 1.0 in that case and 0.0 otherwise.
    """
    records = [r for r in records if r.label != LABEL_UNKNOWN]
    reals = [r for r in records if r.label == 0]
    by_group: Dict[str, List[ImageRecord]] = defaultdict(list)
    for record in records:
        if record.group is not None:
            by_group[record.group].append(record)
    breakdown = {}
    for group in sorted(by_group):
        members = by_group[group]
        group_metrics = compute_ddl_metrics(members, warn=False)
        only_fakes = group_metrics["num_real"] == 0
        if only_fakes and "auc" in group_metrics and reals:
            # one NaN-free AUC per forgery type: its fakes against every real image
            group_metrics["auc"] = roc_auc(
                [1] * len(members) + [0] * len(reals),
                [r.fake_prob for r in members] + [r.fake_prob for r in reals],
                warn=False,
            )
            if "score" in group_metrics:
                group_metrics["score"] = (
                    group_metrics["auc"] + group_metrics["f1"] + group_metrics["iou"]
                ) / 3
        if "auc" in group_metrics:
            group_metrics["auc_vs_all_reals"] = float(only_fakes and bool(reals))
        breakdown[group] = group_metrics
    return breakdown


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
    rows = [("all", metrics)] + sorted((groups or {}).items())
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
        table += "\n* AUC of the subset's fake images against all real images"
    return table
