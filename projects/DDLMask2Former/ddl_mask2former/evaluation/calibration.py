"""Calibrating the verdict (``modeling/verdict.py``) and measuring its rules against each other.

* ``VerdictCollector``: a detectron2 evaluator that keeps, per image, the verdict features of
  the model's raw output (``verdict_features``) and the pixel counts of its raw mask against
  the ground truth.
* ``fit_rule``: L2-regularized logistic regression of the label on a rule's features (Platt
  scaling for one feature), then the threshold that calls at most ``target_fpr`` of the real
  images fake.
* ``calibrate_model``: runs a model over calibration datasets and stores every rule's fit in
  its ``Verdict`` buffers (they are saved with the weights).
* ``rule_metrics``: what a fitted rule gives on other records: AUC, per-image F1/IoU under the
  mask policy, false alarms on real images, fakes called real.
"""
import itertools
import logging
import math
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

import numpy as np
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..modeling.verdict import (FEATURES, LOGIT_BOUNDS, RULES, UNKNOWN_ITERATION, rule_probability,
                                verdict_features)
from .conventions import threshold_at_fpr
from .ground_truth import count_against_ground_truth
from .metrics import compute_ddl_metrics_from_arrays, iou_from_counts

__all__ = ["VerdictCalibrationError", "VerdictRecord", "VerdictCollector", "RuleFit", "fit_logistic", "threshold_at_fpr",
           "fit_rule", "calibrate_model", "rule_metrics", "unwrap_model"]

logger = logging.getLogger(__name__)

# L2 penalty on the standardized weights (sklearn's default C = 1): keeps the fit finite when
# a calibration split is separable, as a small one often is.
L2_PENALTY = 1.0


class VerdictCalibrationError(RuntimeError):
    """A checkpoint's verdict cannot be made fit for evaluation; the message says how to go on."""


class VerdictRecord(NamedTuple):
    """One image: its label, the raw output's verdict features (``FEATURES`` order; NaN where a
    branch is off) and the raw mask's pixel counts (-1 without localization)."""

    name: str
    label: int
    features: tuple
    tp: int
    fp: int
    fn: int
    num_pixels: int


class VerdictCollector(DatasetEvaluator):
    """Collects ``VerdictRecord``s of raw outputs (run the model with ``verdict.active`` False);
    ``evaluate`` gathers them from every process into ``self.records`` on each of them."""

    def __init__(self, gt_mask_threshold: int = 127):
        self.gt_mask_threshold = gt_mask_threshold
        self.records: List[VerdictRecord] = []

    def reset(self):
        self.records = []

    def process(self, inputs, outputs):
        for image_input, output in zip(inputs, outputs):
            file_name = image_input["file_name"]
            if "label" not in image_input:
                raise ValueError(f"{file_name}: calibration needs labeled images (real/ and fake/)")
            label = int(image_input["label"])
            tp = fp = fn = -1
            if "mask_prob" in output:
                pred = (output["mask_prob"].detach().float() > 0.5).cpu().numpy()
                mask_file = image_input.get("mask_file") if label == 1 else None
                tp, fp, fn = count_against_ground_truth(pred, mask_file, self.gt_mask_threshold, file_name)
            features = tuple(verdict_features(output).tolist())
            num_pixels = int(image_input["height"]) * int(image_input["width"])
            self.records.append(VerdictRecord(file_name, label, features, tp, fp, fn, num_pixels))

    def evaluate(self):
        gathered = comm.all_gather(self.records)
        self.records = sorted(itertools.chain(*gathered), key=lambda r: r.name)
        return {}


class RuleFit(NamedTuple):
    """A fitted rule: weights per feature, intercept, threshold and what they give on the
    calibration records themselves."""

    rule: str
    coefficients: Dict[str, float]
    intercept: float
    threshold: float
    target_fpr: float
    fpr: float
    tpr: float


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2_PENALTY, iterations: int = 100):
    """Weights and intercept of P(y=1|x) = sigmoid(x . w + b), minimizing the summed log loss +
    l2/2 * |w_std|^2, where w_std are the weights of the standardized features. Newton's
    method in float64: deterministic, a few iterations for a handful of features."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"fit_logistic needs x (N, F) and y (N,), got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("fit_logistic: features must be finite")
    if len(np.unique(y)) != 2:
        raise ValueError("fit_logistic needs both real (0) and fake (1) examples")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((x.shape[0], 1))])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0  # no penalty on the intercept
    theta = np.zeros(z.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(z @ theta)))
        gradient = z.T @ (p - y) + penalty * theta
        hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(z.shape[1])
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    weights = theta[:-1] / scale
    intercept = theta[-1] - float(weights @ mean)
    return weights, float(intercept)


def _features_of(records: Sequence[VerdictRecord], rule: str) -> np.ndarray:
    columns = [FEATURES.index(f) for f in RULES[rule]]
    x = np.asarray([r.features for r in records], dtype=np.float64).reshape(-1, len(FEATURES))[:, columns]
    if not np.isfinite(x).all():
        raise ValueError(f"verdict rule {rule!r} reads {list(RULES[rule])}, which the model's "
                         "outputs do not all have (is a branch turned off in MODEL.DDL.TASKS?)")
    return x


def probabilities(records: Sequence[VerdictRecord], fit: RuleFit) -> np.ndarray:
    """fake_prob of each record under a fitted rule: the values the model outputs, bit for bit
    (``rule_probability``, the function ``Verdict`` uses)."""
    x = _features_of(records, fit.rule)
    weights = [fit.coefficients[f] for f in RULES[fit.rule]]
    return np.asarray([rule_probability(row, weights, fit.intercept) for row in x.tolist()], dtype=np.float64)


def fit_rule(records: Sequence[VerdictRecord], rule: str, target_fpr: float) -> RuleFit:
    """Fit ``rule`` on labeled records (see the module docstring)."""
    labels = np.asarray([r.label for r in records])
    weights, intercept = fit_logistic(_features_of(records, rule), labels)
    provisional = RuleFit(rule, dict(zip(RULES[rule], weights.tolist())), intercept, 0.5,
                          target_fpr, math.nan, math.nan)
    probs = probabilities(records, provisional)
    threshold = threshold_at_fpr(probs[labels == 0], target_fpr)
    called_fake = probs > threshold
    _warn_if_at_a_bound(records, rule, probs, labels, threshold, target_fpr)
    return provisional._replace(threshold=threshold,
                                fpr=float(called_fake[labels == 0].mean()),
                                tpr=float(called_fake[labels == 1].mean()))


def _warn_if_at_a_bound(records, rule, probs, labels, threshold, target_fpr):
    """Warn when the threshold is set by calibration reals whose log-odds features are saturated
    (``LOGIT_BOUNDS``): they tie there, so every image that saturates too is called real."""
    x = _features_of(records, rule)
    logit_columns = [i for i, f in enumerate(RULES[rule]) if f != "map_area"]
    saturated = np.isin(x[:, logit_columns], LOGIT_BOUNDS).any(axis=1) if logit_columns else np.zeros(len(x), bool)
    at_threshold = (probs == threshold) & saturated & (labels == 0)
    if at_threshold.any():
        logger.warning(
            "Verdict rule %r: the threshold %.6g at TARGET_FPR %g sits at a saturated feature (%d calibration "
            "reals and %d fakes score exactly there, their float32 probability at 0 or 1); every image "
            "that saturates is called real", rule, threshold, target_fpr, int(at_threshold.sum()),
            int(((probs == threshold) & (labels == 1)).sum()))


def unwrap_model(model):
    """The DDLMask2Former inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def collect_records(model, data_loader, gt_mask_threshold: int = 127) -> List[VerdictRecord]:
    """Run ``model`` over ``data_loader`` with its verdict switched off; the raw records of every
    process, on every process."""
    from detectron2.evaluation import inference_on_dataset

    verdict = unwrap_model(model).verdict
    collector = VerdictCollector(gt_mask_threshold)
    previous, verdict.active = verdict.active, False
    try:
        inference_on_dataset(model, data_loader, collector)
    finally:
        verdict.active = previous
    return collector.records


def calibrate_model(model, records: Sequence[VerdictRecord], target_fpr: float,
                    rules: Iterable[str] = None, iteration: Optional[int] = None) -> List[RuleFit]:
    """Fit every rule the model's outputs allow (default: all that ``records`` have the
    features for) on ``records`` and store the fits in the model's verdict, marked as fitted on
    the weights of training ``iteration`` (None: unknown)."""
    verdict = unwrap_model(model).verdict
    labels = {r.label for r in records}
    if labels != {0, 1}:
        raise ValueError(f"calibration needs real and fake images; the calibration data has "
                         f"{sum(r.label == 0 for r in records)} real and "
                         f"{sum(r.label == 1 for r in records)} fake")
    fits = []
    for rule in rules or [rule for rule in RULES if _has_features(records, rule)]:
        fit = fit_rule(records, rule, target_fpr)
        verdict.set_calibration(rule, fit.coefficients, fit.intercept, fit.threshold, target_fpr)
        fits.append(fit)
    verdict.calibration_iteration.fill_(UNKNOWN_ITERATION if iteration is None else int(iteration))
    return fits


def _has_features(records: Sequence[VerdictRecord], rule: str) -> bool:
    """Whether every record has the features ``rule`` reads (a branch turned off has NaN)."""
    columns = [FEATURES.index(f) for f in RULES[rule]]
    return bool(np.isfinite(np.asarray([r.features for r in records], dtype=np.float64)[:, columns]).all())


def rule_metrics(records: Sequence[VerdictRecord], fit: RuleFit, mask_policy: str = "gate") -> Dict[str, float]:
    """DDL metrics of ``records`` when the verdict comes from ``fit`` (fractions): ``auc``,
    per-image ``f1``/``iou``, ``score``, ``real_false_alarm`` and ``real_forged_frac`` under
    ``mask_policy``, plus ``real_called_fake``, ``fake_called_real`` and
    ``good_fake_called_real`` (fakes whose raw mask has IoU >= 0.5, called real)."""
    labels = np.asarray([r.label for r in records])
    probs = probabilities(records, fit)
    called_fake = probs > fit.threshold
    tp, fp, fn = (np.asarray([getattr(r, k) for r in records], dtype=np.int64) for k in ("tp", "fp", "fn"))
    num_pixels = np.asarray([r.num_pixels for r in records], dtype=np.int64)
    raw_iou = np.asarray([iou_from_counts(*c) if c[0] >= 0 else math.nan for c in zip(tp, fp, fn)])
    if mask_policy == "gate":
        # an image called real gets an empty mask: its true positives become misses
        fn = np.where(called_fake, fn, fn + tp)
        tp = np.where(called_fake, tp, 0)
        fp = np.where(called_fake, fp, 0)
    metrics = compute_ddl_metrics_from_arrays(labels, probs, tp, fp, fn, num_pixels, warn=False)
    real, fake = labels == 0, labels == 1
    metrics["real_called_fake"] = float(called_fake[real].mean())
    metrics["fake_called_real"] = float((~called_fake[fake]).mean())
    metrics["good_fake_called_real"] = int(np.sum(fake & ~called_fake & (raw_iou >= 0.5)))
    metrics["threshold"] = fit.threshold
    return metrics

