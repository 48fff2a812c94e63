"""The inference rules around the network, in numpy: tile placement and blending weights, the
image's fake_prob from its tiles, flip averaging, the verdict's features and probability, and
the mask gate.

The constants and formulas here are the definitions; the PyTorch model
(``ddl_mask2former.modeling.tiled_inference`` and ``.verdict``) imports them, and
``tools/export_model.py`` writes every parameter (tile size, overlap, fake_prob rule, verdict
rule, coefficients, threshold, target FPR, mask policy, ``top_fraction``, ``area_floor``,
``eps``) into the settings JSON beside the exported file, which the runtime reads: nothing
here is a setting. See ``ddl_mask2former/modeling/tiled_inference.py`` and ``verdict.py`` for
what the rules mean.
"""
import math
from typing import Dict, List, Mapping, Optional

import numpy as np

__all__ = ["FAKE_PROB_RULES", "RULES_WITH_GLOBAL_VIEW", "FEATURES", "RULES", "MASK_POLICIES", "TOP_FRACTION",
           "AREA_FLOOR", "EPS", "tile_starts", "tile_ramp", "tile_weights", "blend_normalizers",
           "average_with_mirrored", "verdict_features", "verdict_probability", "apply_verdict"]

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
# Probabilities are clamped to [EPS, 1 - EPS] before the logit (float32 sigmoids saturate).
EPS = 1e-6


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


def _logit(p, eps: float) -> float:
    p = min(max(float(p), eps), 1.0 - eps)
    return math.log(p) - math.log1p(-p)


def verdict_features(fake_prob: Optional[float], mask_prob: Optional[np.ndarray],
                     top_fraction: float, area_floor: float, eps: float) -> np.ndarray:
    """(len(FEATURES),) float64 features; NaN where the branch a feature needs is absent."""
    features = np.full(len(FEATURES), np.nan, dtype=np.float64)
    if fake_prob is not None:
        features[0] = _logit(np.float32(fake_prob), eps)
    if mask_prob is not None:
        values = np.asarray(mask_prob, dtype=np.float32).ravel()
        count = max(1, int(math.ceil(top_fraction * values.size)))
        top = np.partition(values, values.size - count)[values.size - count:]
        features[1] = _logit(top.max(), eps)
        features[2] = _logit(top.astype(np.float64).mean(), eps)
        area = np.count_nonzero(values > 0.5) / values.size
        features[3] = math.log(area + area_floor)
    return features


def verdict_probability(features: np.ndarray, verdict: Mapping) -> float:
    """float64 fake_prob = sigmoid(w . x + b) over the features the rule reads."""
    z = float(verdict["intercept"])
    for feature, weight in verdict["features"].items():
        z += float(weight) * float(features[FEATURES.index(feature)])
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def apply_verdict(output: Dict, verdict: Mapping) -> Dict:
    """The final output: calibrated ``fake_prob``, ``is_fake`` and the mask policy applied.

    ``verdict``: the settings JSON's ``verdict`` entry (rule, features, intercept, threshold,
    mask_policy, top_fraction, area_floor, eps)."""
    features = verdict_features(output.get("fake_prob"), output.get("mask_prob"), verdict["top_fraction"],
                                verdict["area_floor"], verdict["eps"])
    fake_prob = verdict_probability(features, verdict)
    is_fake = fake_prob > float(verdict["threshold"])
    result = dict(output, fake_prob=np.float32(fake_prob), is_fake=is_fake)
    if verdict["mask_policy"] == "gate" and not is_fake and "mask_prob" in output:
        result["mask_prob"] = np.zeros_like(output["mask_prob"])
    return result
