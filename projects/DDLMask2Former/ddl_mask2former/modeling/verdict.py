"""The image-level verdict: ``fake_prob`` from the detection head and the localization map,
calibrated, with a threshold at a stated false-positive rate, and one mask policy.

The network gives two pieces of evidence per image (after tiling and flip, at the original
size): the detection head's probability ``p_head`` and the forgery map ``M = mask_prob``.
From them come four verdict features (natural-log odds, so that a linear model of them is a
logistic regression; computed in float64 from the float32 values without a clamp, so two
different outputs never tie; only a sigmoid saturated at exactly 0 or 1 in float32, beyond
log odds of about -103 or 16.6, takes a bound, ``LOGIT_BOUNDS``, and calibration warns when a
threshold lands there):

====================  ==================================================================
``head``              logit(p_head), the paper's linear head
``map_max``           logit(max M): the most confident query's confidence x its mask at its
                      strongest pixel (M is the max over queries of that product)
``map_top``           logit(mean of the top ``TOP_FRACTION`` of M's pixels), a max that one
                      stray pixel cannot set
``map_area``          log(share of pixels with M > 0.5 + ``AREA_FLOOR``)
====================  ==================================================================

A rule (``MODEL.DDL.VERDICT.RULE``) picks which features it reads; every rule computes
``fake_prob = sigmoid(w . x + b)`` over its features x. Uncalibrated, w picks the rule's
first feature (``head``: the head's probability unchanged; ``map_max``: max M; ``fusion``: the
mean of the head's and the map's log odds) and b = 0. Calibration (``evaluation/calibration.py``)
fits w and b by L2-regularized logistic regression on a calibration split that no reported
figure comes from (one input feature: Platt scaling), and sets the threshold so that at most
``TARGET_FPR`` of that split's real images score above it. All rules are fitted at once and
kept in this module's buffers, so they travel inside the checkpoint with the weights and a
config may switch rules without recalibrating. ``calibration_iteration`` records the training
iteration whose weights the fit belongs to (the checkpoint's ``iteration``; -1 when unknown), so
that evaluation can tell a fit made on other weights (``engine.prepare_verdict``).

The verdict is FAKE exactly when ``fake_prob > threshold``, with ``fake_prob`` the float64 value
that outputs and exports carry (``rule_probability``; calibration scores with the same function).
The features' formulas, their constants and ``rule_probability`` are defined once, in
``ddl_mask2former_serve.rules``, which the torch-free runtime of exported files applies too.
Mask policy (``MODEL.DDL.VERDICT.MASK_POLICY``):

* ``"gate"``: an image called real gets an all-zero ``mask_prob`` and an empty ``mask``, so
  an image called real carries no region and every region belongs to an image called fake
  (with ``keep_evidence``, set while an evaluation exports, the map before the gate stays in
  ``ungated_mask_prob`` and the head's probability in ``head_prob``, for the ensembles of
  ``evaluation/fusion.py``);
* ``"independent"``: the map is returned as the localization branch made it (the paper).
"""
from typing import Dict, Optional

import torch
from torch import nn

# The features, rules, mask policies, constants, the log odds and the probability are defined
# once, with the serving runtime's numpy rules; exports write the constants into the settings JSON.
from ddl_mask2former_serve import rules as _rules
from ddl_mask2former_serve.rules import (AREA_FLOOR, FEATURES, LOGIT_BOUNDS, MASK_POLICIES, PROB_CEILING,
                                         PROB_FLOOR, RULES, TOP_FRACTION, rule_probability)

__all__ = ["FEATURES", "RULES", "MASK_POLICIES", "TOP_FRACTION", "AREA_FLOOR", "LOGIT_BOUNDS", "UNKNOWN_ITERATION",
           "Verdict", "rule_probability", "verdict_features"]

# calibration_iteration when the weights' iteration is not known.
UNKNOWN_ITERATION = -1
# target_fprs of a rule that calibration has not fitted.
_NOT_FITTED = -1.0


def verdict_features(output: Dict) -> torch.Tensor:
    """(len(FEATURES),) float64 features of one image's raw output; NaN where the output lacks
    the branch a feature needs (no ``fake_prob``: ``head``; no ``mask_prob``: the map's). The
    top values are selected on the output's device; the log odds and the features are
    ``ddl_mask2former_serve.rules``' (``logit``, ``map_features``), as the runtime computes them."""
    features = [float("nan")] * len(FEATURES)
    if "fake_prob" in output:
        features[0] = _rules.logit(float(output["fake_prob"].detach().reshape(())))
    if "mask_prob" in output:
        values = output["mask_prob"].detach().float().flatten()
        top = torch.topk(values, _rules.top_count(values.numel(), TOP_FRACTION), sorted=False).values
        marked = int(torch.count_nonzero(values > 0.5))
        features[1:] = _rules.map_features(top.cpu().numpy(), marked, values.numel(), AREA_FLOOR)
    return torch.tensor(features, dtype=torch.float64)


class Verdict(nn.Module):
    """Turns one raw output dict into the final one: calibrated ``fake_prob``, ``is_fake`` and
    the mask policy (see the module docstring). Buffers (saved with the weights):
    ``coefficients`` (rules x features), ``intercepts`` and ``thresholds`` (one per rule),
    ``target_fprs`` (the rate each threshold was set at; -1 for a rule not fitted) and
    ``calibration_iteration`` (the weights' training iteration the fits belong to; -1 unknown)."""

    # 2: calibration_iteration added (a version-1 checkpoint loads with -1, "unknown").
    _version = 2

    def __init__(self, rule: str = "head", mask_policy: str = "gate",
                 has_detection: bool = True, has_localization: bool = True):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"MODEL.DDL.VERDICT.RULE must be one of {sorted(RULES)}, got {rule!r}")
        if mask_policy not in MASK_POLICIES:
            raise ValueError(f"MODEL.DDL.VERDICT.MASK_POLICY must be one of {MASK_POLICIES}, got "
                             f"{mask_policy!r}")
        missing = [f for f in RULES[rule] if not _available(f, has_detection, has_localization)]
        # The head rule without a detection branch is "no verdict", as before the rules existed;
        # a rule that reads the map cannot run without it.
        if missing and rule != "head":
            raise ValueError(f"MODEL.DDL.VERDICT.RULE {rule!r} reads {list(RULES[rule])}, but "
                             f"MODEL.DDL.TASKS lacks the branch for {missing}")
        self.rule = rule
        self.mask_policy = mask_policy
        self.enabled = not missing
        self.has_localization = has_localization
        # False: outputs pass through unchanged (calibration reads the raw outputs).
        self.active = True
        # True: outputs also carry the evidence before the verdict, head_prob and (for a map the
        # gate emptied) ungated_mask_prob, which exports write for ensembles (Trainer.test).
        self.keep_evidence = False
        # Uncalibrated: the rule's first feature as it is; fusion: the mean of the head's and
        # the map maximum's log odds.
        coefficients = torch.zeros(len(RULES), len(FEATURES), dtype=torch.float64)
        for index, features in enumerate(RULES.values()):
            defaults = features[:1] if len(features) == 1 else ("head", "map_max")
            for feature in defaults:
                coefficients[index, FEATURES.index(feature)] = 1.0 / len(defaults)
        self.register_buffer("coefficients", coefficients)
        self.register_buffer("intercepts", torch.zeros(len(RULES), dtype=torch.float64))
        self.register_buffer("thresholds", torch.full((len(RULES),), 0.5, dtype=torch.float64))
        self.register_buffer("target_fprs", torch.full((len(RULES),), _NOT_FITTED, dtype=torch.float64))
        self.register_buffer("calibration_iteration", torch.tensor(UNKNOWN_ITERATION, dtype=torch.int64))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "calibration_iteration"
        if local_metadata.get("version", 1) < 2 and key not in state_dict:
            state_dict[key] = torch.tensor(UNKNOWN_ITERATION, dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @classmethod
    def from_config(cls, cfg) -> "Verdict":
        tasks = cfg.MODEL.DDL.TASKS
        return cls(cfg.MODEL.DDL.VERDICT.RULE, cfg.MODEL.DDL.VERDICT.MASK_POLICY,
                   "detection" in tasks, "localization" in tasks)

    @property
    def rule_index(self) -> int:
        return list(RULES).index(self.rule)

    @property
    def threshold(self) -> float:
        """fake_prob above which the verdict is FAKE."""
        return float(self.thresholds[self.rule_index])

    def set_calibration(self, rule: str, coefficients: Dict[str, float], intercept: float,
                        threshold: float, target_fpr: float) -> None:
        """Store one rule's fitted parameters (``coefficients``: feature -> weight)."""
        index = list(RULES).index(rule)
        unknown = set(coefficients) - set(RULES[rule])
        if unknown:
            raise ValueError(f"rule {rule!r} reads {list(RULES[rule])}, not {sorted(unknown)}")
        row = torch.zeros(len(FEATURES), dtype=torch.float64)
        for feature, weight in coefficients.items():
            row[FEATURES.index(feature)] = float(weight)
        self.coefficients[index] = row
        self.intercepts[index] = float(intercept)
        self.thresholds[index] = float(threshold)
        self.target_fprs[index] = float(target_fpr)

    @property
    def calibrated(self) -> bool:
        """Whether the rule in use has been fitted by calibration."""
        return float(self.target_fprs[self.rule_index]) != _NOT_FITTED

    @property
    def fitted_at_iteration(self) -> Optional[int]:
        """The training iteration of the weights the calibration was fitted on (None: unknown)."""
        iteration = int(self.calibration_iteration)
        return None if iteration == UNKNOWN_ITERATION else iteration

    @property
    def target_fpr(self) -> Optional[float]:
        """The false-positive rate the rule in use was calibrated at (None: not calibrated)."""
        target = float(self.target_fprs[self.rule_index])
        return None if target == _NOT_FITTED else target

    def describe(self) -> Dict:
        """The rule in use and its parameters, as plain numbers (exports write it as JSON)."""
        index = self.rule_index
        return {
            "rule": self.rule,
            "features": {f: float(self.coefficients[index, FEATURES.index(f)]) for f in RULES[self.rule]},
            "intercept": float(self.intercepts[index]),
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "calibrated": self.calibrated,
            "calibration_iteration": self.fitted_at_iteration,
            "mask_policy": self.mask_policy,
            # The features' constants, so an exported file's runtime reads them from its settings.
            "top_fraction": TOP_FRACTION,
            "area_floor": AREA_FLOOR,
            "prob_floor": PROB_FLOOR,
            "prob_ceiling": PROB_CEILING,
        }

    def probability(self, features: torch.Tensor, rule: Optional[str] = None) -> torch.Tensor:
        """float64 fake_prob of (..., len(FEATURES)) features under ``rule`` (default: the rule in
        use), each row by ``rule_probability``; features the rule does not read may be NaN."""
        index = list(RULES).index(rule or self.rule)
        used = [FEATURES.index(f) for f in RULES[rule or self.rule]]
        weights = self.coefficients[index, used].tolist()
        intercept = float(self.intercepts[index])
        rows = features.detach().double().cpu().reshape(-1, len(FEATURES))[:, used].tolist()
        probs = [rule_probability(row, weights, intercept) for row in rows]
        return torch.tensor(probs, dtype=torch.float64).reshape(features.shape[:-1])

    def forward(self, output: Dict) -> Dict:
        if not (self.active and self.enabled):
            return output
        fake_prob = self.probability(verdict_features(output))
        device = output["fake_prob"].device if "fake_prob" in output else output["mask_prob"].device
        result = dict(output, fake_prob=fake_prob.to(device))
        if self.keep_evidence and "fake_prob" in output:
            result["head_prob"] = output["fake_prob"]
        # The value that outputs and exports carry (float64) is the one compared.
        is_fake = float(fake_prob) > self.threshold
        result["is_fake"] = torch.tensor(is_fake, device=device)
        if self.mask_policy == "gate" and not is_fake and "mask_prob" in output:
            result["mask_prob"] = torch.zeros_like(output["mask_prob"])
            result["mask"] = torch.zeros_like(output["mask"])
            if self.keep_evidence:
                result["ungated_mask_prob"] = output["mask_prob"]
        return result


def _available(feature: str, has_detection: bool, has_localization: bool) -> bool:
    return has_detection if feature == "head" else has_localization

