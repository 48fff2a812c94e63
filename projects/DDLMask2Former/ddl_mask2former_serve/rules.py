"""The inference rules around the network, in numpy: tile placement and blending weights, the
image's fake_prob from its tiles, flip averaging, the verdict's features and probability, and
the mask gate.

The constants and formulas here are the definitions; the PyTorch model
(``ddl_mask2former.modeling.tiled_inference`` and ``.verdict``) imports them, and
``tools/export_model.py`` writes every parameter (tile size, overlap, fake_prob rule, verdict
rule, coefficients, threshold, target FPR, mask policy, ``top_fraction``, ``area_floor``,
``prob_floor``, ``prob_ceiling``) into the settings JSON beside the exported file, which the
runtime reads: nothing here is a setting. See ``ddl_mask2former/modeling/tiled_inference.py`` and ``verdict.py`` for
what the rules mean.
"""
import math
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["FAKE_PROB_RULES", "RULES_WITH_GLOBAL_VIEW", "FEATURES", "RULES", "MASK_POLICIES", "TOP_FRACTION",
           "AREA_FLOOR", "PROB_FLOOR", "PROB_CEILING", "LOGIT_BOUNDS", "tile_starts", "tile_ramp", "tile_weights",
           "blend_normalizers", "average_with_mirrored", "logit", "top_count", "map_features", "verdict_features",
           "rule_probability", "apply_verdict"]

# How the image's fake_prob is made from the tiles' fake_probs (an array: numpy or torch) and
# the global view's.
FAKE_PROB_RULES = {
    "tile_max": lambda tiles, whole: tiles.max(),
    "tile_mean": lambda tiles, whole: tiles.mean(),
    "global": lambda tiles, whole: whole,
    "global_tile_max": lambda tiles, whole: 0.5 * (whole + tiles.max()),
}
RULES_WITH_GLOBAL_VIEW = ("global", "global_tile_max")

FEATURES = ("head", "map_max", "map_top", "map_area")
# rule -> the features it reads (the first one is the uncalibrated default's)
RULES = {
    "head": ("head",),
    "map_max": ("map_max",),
    "map_top": ("map_top",),
    "fusion": ("head", "map_max", "map_top", "map_area"),
}
MASK_POLICIES = ("gate", "independent")
# map_top: the share of the map's pixels averaged (at least one pixel).
TOP_FRACTION = 0.005
# map_area: added to the marked share before the log, so an empty map has a finite feature.
AREA_FLOOR = 1e-4
# A float32 probability of exactly 0 or 1 (a saturated sigmoid) takes these, just beyond every
# other float32 value (the smallest subnormal 2**-149, the largest below 1, 1 - 2**-24), so the
# log odds are strictly increasing in the float32 value: distinct outputs never tie.
PROB_FLOOR = 2.0 ** -150
PROB_CEILING = 1.0 - 2.0 ** -25


def tile_starts(length: int, tile_size: int, overlap: int) -> List[int]:
    """Start offsets of the tiles along an axis of ``length`` pixels: every ``tile_size -
    overlap`` pixels, the last one moved back to end at the border; one tile if it fits."""
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    return list(range(0, length - tile_size, stride)) + [length - tile_size]


def tile_ramp(overlap: int) -> np.ndarray:
    """float64 sin^2 ramp over ``overlap`` pixels, rising from ~0 to ~1."""
    position = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
    return np.sin(0.5 * math.pi * position) ** 2


def tile_weights(length: int, start: int, tile_length: int, overlap: int) -> np.ndarray:
    """float32 1-D blending weights of the tile ``[start, start + tile_length)`` on an axis of
    ``length``: the ramp over ``overlap`` pixels at each end that has a neighbour, 1 elsewhere."""
    weights = np.ones(tile_length, dtype=np.float64)
    ramp_length = min(overlap, tile_length)
    if ramp_length == 0:
        return weights.astype(np.float32)
    ramp = tile_ramp(ramp_length)
    if start > 0:
        weights[:ramp_length] = np.minimum(weights[:ramp_length], ramp)
    if start + tile_length < length:
        weights[-ramp_length:] = np.minimum(weights[-ramp_length:], ramp[::-1])
    return weights.astype(np.float32)


def blend_normalizers(length: int, starts: List[int], weights: List[np.ndarray]) -> np.ndarray:
    """float32 per-pixel sum of the tiles' weights along one axis (summed in float64)."""
    norm = np.zeros(length, dtype=np.float64)
    for start, tile in zip(starts, weights):
        norm[start:start + len(tile)] += tile.astype(np.float64)
    return norm.astype(np.float32)


def average_with_mirrored(output: Dict, mirrored: Dict) -> Dict:
    """Mean of an output and the mirrored input's output, flipped back (numpy float32)."""
    averaged = {}
    if "fake_prob" in output:
        averaged["fake_prob"] = np.float32(0.5) * (output["fake_prob"] + mirrored["fake_prob"])
    if "mask_prob" in output:
        averaged["mask_prob"] = np.float32(0.5) * (output["mask_prob"] + mirrored["mask_prob"][:, ::-1])
    return averaged


def logit(p: float, floor: float = PROB_FLOOR, ceiling: float = PROB_CEILING) -> float:
    """Log odds in float64 of a probability (a float32 output, or a float64 mean of them),
    exact: log and log1p of the value itself, which only a value outside [floor, ceiling] (with
    the defaults: a float32 0 or 1) leaves for the bound."""
    p = min(max(float(p), floor), ceiling)
    return math.log(p) - math.log1p(-p)


# The log odds a saturated probability (0 or 1) gets: the bounds of the logit features.
LOGIT_BOUNDS = (logit(PROB_FLOOR), logit(PROB_CEILING))


def top_count(size: int, top_fraction: float = TOP_FRACTION) -> int:
    """How many of a map's ``size`` pixels ``map_top`` averages: the top ``top_fraction``, at
    least one."""
    return max(1, int(math.ceil(top_fraction * size)))


def map_features(top_values: np.ndarray, marked: int, size: int, area_floor: float = AREA_FLOOR,
                 floor: float = PROB_FLOOR, ceiling: float = PROB_CEILING):
    """(map_max, map_top, map_area) float64 features of a map of ``size`` pixels from its
    ``top_count`` largest values ``top_values`` (float32, any order) and ``marked``, the count
    of its pixels above 0.5. The mean is the correctly rounded sum (``math.fsum``) over the
    count, so it does not depend on the order the values come in."""
    top = np.asarray(top_values, dtype=np.float32).ravel()
    return (logit(top.max(), floor, ceiling),
            logit(math.fsum(top.tolist()) / top.size, floor, ceiling),
            math.log(marked / size + area_floor))


def verdict_features(fake_prob: Optional[float], mask_prob: Optional[np.ndarray],
                     top_fraction: float = TOP_FRACTION, area_floor: float = AREA_FLOOR,
                     floor: float = PROB_FLOOR, ceiling: float = PROB_CEILING) -> np.ndarray:
    """(len(FEATURES),) float64 features of the raw ``fake_prob`` (float32) and ``mask_prob``
    (HxW float32) of one image; NaN where the branch a feature needs is absent. The PyTorch
    model (``ddl_mask2former.modeling.verdict.verdict_features``) selects the top values on its
    device and goes through ``logit`` and ``map_features`` as here."""
    features = np.full(len(FEATURES), np.nan, dtype=np.float64)
    if fake_prob is not None:
        features[0] = logit(fake_prob, floor, ceiling)
    if mask_prob is not None:
        values = np.asarray(mask_prob, dtype=np.float32).ravel()
        count = top_count(values.size, top_fraction)
        top = np.partition(values, values.size - count)[values.size - count:]
        features[1:] = map_features(top, int(np.count_nonzero(values > 0.5)), values.size, area_floor, floor,
                                    ceiling)
    return features


def rule_probability(features: Sequence[float], weights: Sequence[float], intercept: float) -> float:
    """One image's fake_prob, sigmoid(w . x + b), in Python's own float64 arithmetic, term by
    term in ``RULES`` order, so that the model, its calibration
    (``ddl_mask2former/evaluation/calibration.py``) and this runtime get the same bits, and
    outputs and exports carry that float64 value (a float32 one would round every score above
    1 - 6e-8 to 1 and tie them)."""
    z = float(intercept)
    for value, weight in zip(features, weights):
        z += float(value) * float(weight)
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def apply_verdict(output: Dict, verdict: Mapping) -> Dict:
    """The final output: calibrated ``fake_prob`` (a Python float64, the value compared),
    ``is_fake = fake_prob > threshold`` and the mask policy applied.

    ``verdict``: the settings JSON's ``verdict`` entry (rule, features, intercept, threshold,
    mask_policy, top_fraction, area_floor, prob_floor, prob_ceiling)."""
    features = verdict_features(output.get("fake_prob"), output.get("mask_prob"), verdict["top_fraction"],
                                verdict["area_floor"], verdict["prob_floor"], verdict["prob_ceiling"])
    used = RULES[verdict["rule"]]
    fake_prob = rule_probability([features[FEATURES.index(f)] for f in used],
                                 [verdict["features"][f] for f in used], verdict["intercept"])
    is_fake = fake_prob > float(verdict["threshold"])
    result = dict(output, fake_prob=fake_prob, is_fake=is_fake)
    if verdict["mask_policy"] == "gate" and not is_fake and "mask_prob" in output:
        result["mask_prob"] = np.zeros_like(output["mask_prob"])
    return result
