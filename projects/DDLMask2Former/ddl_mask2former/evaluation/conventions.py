"""Other papers' metric conventions, computed on the same predictions as the DDL headline.

The DDL figures (``metrics.py``: per-image F1/IoU at 0.5, AUC) stay the headline. A user who
compares with a paper that scores differently can ask the scorer for these as well
(``tools/evaluate_predictions.py --conventions``); ``docs/EVALUATION.md`` names each source.

(a) **Pooled pixels, two classes** (the first-place DDL code's convention): over the fake
    images, TP/FP/FN/TN summed over all their pixels; ``pooled_f1`` = 2TP/(2TP+FP+FN) and the
    two-class mean IoU ``miou_two_class`` = (IoU of the forged class TP/(TP+FP+FN) + IoU of the
    background class TN/(TN+FN+FP)) / 2.
(b) **Threshold-free localization**, per fake image then averaged:
    ``f1_best_threshold``: the F1 at the image's own best threshold on the 8-bit probability map
    (every code boundary, plus "nothing" and "everything");
    ``f1_inverted_max``: TruFor's max(F1 of the mask, F1 of the inverted mask) at 0.5, which
    does not penalize a map whose polarity is flipped.
(c) **Detection operating points**: at each false-positive rate r (1 % and 5 %), the smallest
    threshold t among the real images' scores such that at most r of them score above t,
    with the true-positive rate (fakes with score > t) and the false-positive rate reached.

Every function works on per-image counts or 256-bin histograms, never on whole masks, so the
scorer's memory does not grow with the split.
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "OPERATING_FPRS",
    "NUM_CODES",
    "code_histograms",
    "best_threshold_f1",
    "inverted_max_f1",
    "pooled_two_class",
    "threshold_at_fpr",
    "operating_point",
    "compute_conventions",
    "format_conventions",
]

# false-positive rates on real images at which the detection operating point is reported
OPERATING_FPRS = (0.01, 0.05)
# an 8-bit probability map has this many codes (export.py: code q >= 128 <=> p > 0.5)
NUM_CODES = 256


def code_histograms(prob_codes: np.ndarray, forged: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per 8-bit code: how many forged and how many authentic ground-truth pixels carry it."""
    prob_codes = np.asarray(prob_codes)
    forged = np.asarray(forged, dtype=bool)
    if prob_codes.dtype != np.uint8:
        raise TypeError(f"probability codes must be uint8, got {prob_codes.dtype}")
    if prob_codes.shape != forged.shape:
        raise ValueError(f"probability map {prob_codes.shape} and ground truth {forged.shape} "
                         "differ in size")
    return (np.bincount(prob_codes[forged], minlength=NUM_CODES).astype(np.int64),
            np.bincount(prob_codes[~forged], minlength=NUM_CODES).astype(np.int64))


def best_threshold_f1(forged_hist: np.ndarray, authentic_hist: np.ndarray) -> Tuple[float, int]:
    """The best F1 over every threshold "code >= k" (k = 0 marks all pixels, 256 none), and k.

    Ties go to the largest k (the sparsest mask). Both masks empty scores 1, as in metrics.py.
    """
    forged_hist = np.asarray(forged_hist, dtype=np.int64)
    authentic_hist = np.asarray(authentic_hist, dtype=np.int64)
    # predicted forged at threshold k = pixels whose code is >= k: suffix sums, k = 0..256
    tp = np.concatenate([np.cumsum(forged_hist[::-1])[::-1], [0]])
    fp = np.concatenate([np.cumsum(authentic_hist[::-1])[::-1], [0]])
    fn = int(forged_hist.sum()) - tp
    denominator = 2 * tp + fp + fn
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
    best = int(np.flatnonzero(f1 == f1.max())[-1])
    return float(f1[best]), best


def inverted_max_f1(tp: int, fp: int, fn: int, tn: int) -> float:
    """max(F1 of the mask, F1 of its inverse) of one image, from its four pixel counts.

    Inverting the prediction turns its positives into the pixels it left out: TP' = FN,
    FP' = TN, FN' = TP.
    """
    def f1(a, b, c):
        return 1.0 if 2 * a + b + c == 0 else 2 * a / (2 * a + b + c)

    return max(f1(tp, fp, fn), f1(fn, tn, tp))


def pooled_two_class(tp: int, fp: int, fn: int, tn: int) -> Dict[str, float]:
    """Pooled F1 and the two-class IoUs from pixel counts summed over the fake images."""
    def ratio(numerator, denominator):
        return float("nan") if denominator == 0 else numerator / denominator

    iou_forged = ratio(tp, tp + fp + fn)
    iou_background = ratio(tn, tn + fn + fp)
    return {
        "pooled_f1": ratio(2 * tp, 2 * tp + fp + fn),
        "iou_forged": iou_forged,
        "iou_background": iou_background,
        "miou_two_class": (iou_forged + iou_background) / 2,
    }


def threshold_at_fpr(real_probs: Sequence[float], target_fpr: float) -> float:
    """The smallest threshold t among the real images' scores such that at most
    ``target_fpr`` of them score above t (the verdict is fake when fake_prob > t; ties at t
    count as real, so the rate reached never exceeds the target).

    The verdict's calibration (MODEL.DDL.VERDICT.TARGET_FPR) and the scorer's operating points
    both use it.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target false-positive rate (MODEL.DDL.VERDICT.TARGET_FPR) must be in "
                         f"[0, 1), got {target_fpr}")
    scores = np.sort(np.asarray(real_probs, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise ValueError("a threshold at a false-positive rate needs at least one real image")
    # Near 1 every real image may score above t, but t is still one of their scores.
    allowed = min(int(math.floor(target_fpr * scores.size + 1e-9)), scores.size - 1)
    return float(scores[allowed])


def operating_point(labels: Sequence[int], scores: Sequence[float], fpr: float) -> Dict[str, float]:
    """Threshold, true-positive rate and reached false-positive rate at a target FPR.

    The threshold is ``threshold_at_fpr`` of the real images' scores.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    real, fake = scores[labels == 0], scores[labels == 1]
    if real.size == 0 or fake.size == 0:
        raise ValueError(f"an operating point needs real and fake images; got {real.size} real "
                         f"and {fake.size} fake")
    threshold = threshold_at_fpr(real, fpr)
    return {"threshold": threshold, "tpr": float(np.mean(fake > threshold)),
            "fpr": float(np.mean(real > threshold))}


def compute_conventions(labels, fake_prob, tp, fp, fn, num_pixels,
                        best_f1: Optional[np.ndarray] = None) -> Dict[str, object]:
    """All conventions of the module docstring, from the scorer's per-image arrays.

    ``best_f1`` holds each image's best-threshold F1 (NaN for real images), or None when no
    probability maps were read; then ``f1_best_threshold`` is None. Detection entries are left
    out when there are no scores; localization entries when there are no counts.
    """
    labels = np.asarray(labels).astype(np.int64)
    fake_prob = np.asarray(fake_prob, dtype=np.float64)
    tp, fp, fn, num_pixels = (np.asarray(a, dtype=np.int64) for a in (tp, fp, fn, num_pixels))
    fake = labels == 1
    results: Dict[str, object] = {}
    labeled = labels >= 0
    if labeled.any() and not np.isnan(fake_prob[labeled]).any():
        results["operating_points"] = {
            f"{100 * fpr:g}%": operating_point(labels[labeled], fake_prob[labeled], fpr)
            for fpr in OPERATING_FPRS}
    if fake.any() and (tp[fake] >= 0).all():
        tn = num_pixels[fake] - tp[fake] - fp[fake] - fn[fake]
        results.update(pooled_two_class(int(tp[fake].sum()), int(fp[fake].sum()),
                                        int(fn[fake].sum()), int(tn.sum())))
        inverted = [inverted_max_f1(*counts) for counts in
                    zip(tp[fake].tolist(), fp[fake].tolist(), fn[fake].tolist(), tn.tolist())]
        results["f1_inverted_max"] = math.fsum(inverted) / len(inverted)
        results["f1_best_threshold"] = None
        if best_f1 is not None:
            per_image = np.asarray(best_f1, dtype=np.float64)[fake]
            results["f1_best_threshold"] = math.fsum(per_image.tolist()) / per_image.size
    return results


def format_conventions(conventions: Dict[str, object]) -> str:
    """The conventions as a few lines of text, in percent."""
    def pct(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else f"{100 * value:.2f}"

    lines = []
    if "pooled_f1" in conventions:
        lines.append(f"pooled pixels over fakes: F1 {pct(conventions['pooled_f1'])}, two-class "
                     f"mIoU {pct(conventions['miou_two_class'])} (forged "
                     f"{pct(conventions['iou_forged'])}, background "
                     f"{pct(conventions['iou_background'])})")
        best = conventions["f1_best_threshold"]
        lines.append(f"per fake image: best-threshold F1 "
                     f"{pct(best) if best is not None else 'n/a (no prob/ maps)'}, "
                     f"max(F1, inverted F1) {pct(conventions['f1_inverted_max'])}")
    for name, point in conventions.get("operating_points", {}).items():
        lines.append(f"detection at {name} FPR: threshold {point['threshold']:.6g}, TPR "
                     f"{pct(point['tpr'])} (FPR reached {pct(point['fpr'])})")
    return "\n".join(lines)
