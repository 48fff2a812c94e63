"""Ensembling of several models' predictions (paper §3.5, eq. 6).

``Y = sum_i w_i * y_i / sum_i w_i``, applied separately to detection scores and to
localization probability maps, each task with its own weights. Weights are normalized first,
so a model with weight 0 contributes exactly nothing and a single non-zero weight returns that
model's predictions bit for bit.

``fuse_exports`` works on export directories (see ``export.py``). It fuses each member's
evidence before its verdict: the detection head's scores (``head_prediction.txt``; an export
without one, made by a model without a verdict, gives ``prediction.txt``) and the ungated maps
(``ungated_prob/`` where the member's gate emptied a map, else ``prob/``), decoded from 8-bit,
fused, re-encoded. A member's gated map or calibrated score would dilute the others' evidence: a
member that called an image real contributes an all-zero map. With a ``Verdict`` the fused
evidence then gets the ensemble's own verdict, as one model's raw outputs get theirs:
``fake_prob``, the threshold and the gate, and the export gets its ``verdict.json``.
``calibrate_ensemble`` fits that verdict (the same rules, ``evaluation/calibration.py``) on the
members' exports of the calibration split. ``search_weights`` grid-searches each task's weights
on a labeled split (on the exported scores and maps as they are).
"""
import itertools
import os
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np

from .export import (
    HEAD_PREDICTION_FILE,
    MASK_DIR,
    PREDICTION_FILE,
    UNGATED_PROB_DIR,
    PROB_CODE_THRESHOLD,
    PROB_THRESHOLD,
    PROB_DIR,
    decode_prob_u8,
    encode_prob_u8,
    mask_file_name,
    read_gray_png,
    read_predictions,
    write_png,
    write_predictions,
    write_verdict_description,
)
from .ground_truth import read_ground_truth
from .metrics import compute_ddl_metrics_from_arrays, mask_counts, roc_auc
from .scoring import SplitIndex, default_num_workers, iter_bounded, list_ddl_split, progress_bar

__all__ = ["normalize_weights", "fuse_predictions", "fuse_exports", "calibrate_ensemble",
           "weight_grid", "search_weights"]


def normalize_weights(weights: Sequence[float], num_inputs: int, task: str) -> np.ndarray:
    """Check one task's weights (non-negative, not all zero) and scale them to sum to 1."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (num_inputs,):
        raise ValueError(f"{task} weights: expected {num_inputs} (one per input), got "
                         f"{weights.size}")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"{task} weights must be finite, non-negative and not all zero, got "
                         f"{weights.tolist()}")
    return weights / weights.sum()


def fuse_predictions(predictions: Sequence, weights: Sequence[float]):
    """Eq. 6 on arrays (or scalars) of equal shape: the weighted mean of the predictions.

    Inputs whose weight is 0 are skipped, so one non-zero weight returns that input unchanged.
    """
    normalized = normalize_weights(weights, len(predictions), "fusion")
    fused = None
    for prediction, weight in zip(predictions, normalized):
        if weight == 0:
            continue
        term = prediction if weight == 1 else weight * np.asarray(prediction, dtype=np.float64)
        fused = term if fused is None else fused + term
    return fused


def _prob_path(export_dir: str, image_name: str) -> str:
    path = os.path.join(export_dir, PROB_DIR, mask_file_name(image_name))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no probability map for {image_name} (ensembling "
                                "needs prob/, written when TEST.EXPORT_PROB is on)")
    return path


def _read_prob(export_dir: str, image_name: str) -> np.ndarray:
    return read_gray_png(_prob_path(export_dir, image_name))


def _ungated_prob_path(export_dir: str, image_name: str) -> str:
    """The member's map before its gate: ``ungated_prob/`` where the gate emptied it, else ``prob/``."""
    path = os.path.join(export_dir, UNGATED_PROB_DIR, mask_file_name(image_name))
    return path if os.path.exists(path) else _prob_path(export_dir, image_name)


def _read_raw_scores(export_dir: str) -> Dict[str, float]:
    """The member's scores before its verdict (``head_prediction.txt``, else ``prediction.txt``)."""
    head = os.path.join(export_dir, HEAD_PREDICTION_FILE)
    return read_predictions(head if os.path.isfile(head) else os.path.join(export_dir, PREDICTION_FILE))


def _fuse_prob_codes(export_dirs: Sequence[str], weights: np.ndarray,
                     image_name: str) -> np.ndarray:
    """Fused 8-bit probability codes of one image over the inputs with non-zero weight."""
    used = [(d, w) for d, w in zip(export_dirs, weights) if w > 0]
    if len(used) == 1:
        # decode + encode is the identity on codes; skip it
        return read_gray_png(_ungated_prob_path(used[0][0], image_name))
    maps = []
    for export_dir, _ in used:
        codes = read_gray_png(_ungated_prob_path(export_dir, image_name))
        if maps and codes.shape != maps[0].shape:
            raise ValueError(f"{image_name}: probability maps differ in size across inputs "
                             f"({maps[0].shape} vs {codes.shape} in {export_dir})")
        maps.append(decode_prob_u8(codes))
    return encode_prob_u8(_fuse_decoded(maps, [w for _, w in used]))


def _fuse_decoded(maps: Sequence[np.ndarray], normalized_weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of decoded float32 maps; the one place both export and search fuse maps."""
    fused = None
    for prob, weight in zip(maps, normalized_weights):
        if weight == 0:
            continue
        term = np.float32(weight) * prob
        fused = term if fused is None else fused + term
    return fused


def _read_all_scores(export_dirs: Sequence[str]) -> List[Dict[str, float]]:
    all_scores = [_read_raw_scores(d) for d in export_dirs]
    reference = set(all_scores[0])
    for export_dir, scores in zip(export_dirs[1:], all_scores[1:]):
        if set(scores) != reference:
            differing = sorted(reference.symmetric_difference(scores))
            raise ValueError(f"{export_dir}: its {PREDICTION_FILE} covers different images than "
                             f"{export_dirs[0]}'s, e.g. {', '.join(differing[:5])}")
    return all_scores


def _image_names(export_dirs: Sequence[str], det_used: bool) -> List[str]:
    """Image names of the inputs: from prediction.txt, else from the first input's prob/."""
    for export_dir in export_dirs:
        if not os.path.isdir(export_dir):
            raise FileNotFoundError(f"{export_dir}: input export directory does not exist")
    if det_used or os.path.isfile(os.path.join(export_dirs[0], PREDICTION_FILE)):
        return sorted(read_predictions(os.path.join(export_dirs[0], PREDICTION_FILE)))
    return sorted(os.listdir(os.path.join(export_dirs[0], PROB_DIR)))


def _fused_evidence(export_dirs, names, det_weights, loc_weights):
    """(fused scores {name: float} or None, normalized loc weights or None): the inputs checked."""
    fused_scores = None
    if det_weights is not None:
        weights = normalize_weights(det_weights, len(export_dirs), "detection")
        all_scores = _read_all_scores(export_dirs)
        fused_scores = {name: float(fuse_predictions([s[name] for s in all_scores], weights)) for name in names}
    loc = None if loc_weights is None else normalize_weights(loc_weights, len(export_dirs), "localization")
    return fused_scores, loc


def _raw_output(fused_score, codes):
    """A model's raw output dict from fused evidence, as ``Verdict`` reads it."""
    import torch

    output = {}
    if fused_score is not None:
        output["fake_prob"] = torch.tensor(fused_score, dtype=torch.float64)
    if codes is not None:
        mask_prob = torch.from_numpy(decode_prob_u8(codes))
        output["mask_prob"], output["mask"] = mask_prob, mask_prob > PROB_THRESHOLD
    return output


def fuse_exports(export_dirs: Sequence[str], out_dir: str,
                 det_weights: Optional[Sequence[float]] = None,
                 loc_weights: Optional[Sequence[float]] = None,
                 num_workers: Optional[int] = None, progress: bool = False,
                 verdict=None) -> int:
    """Fuse export directories into ``out_dir`` (a new export); returns the image count.

    ``det_weights=None`` skips detection (no prediction.txt), ``loc_weights=None`` skips
    localization (no mask/ or prob/). The members' evidence before their verdicts is fused (see
    the module docstring). ``verdict`` (a ``Verdict``, e.g. ``calibrate_ensemble``'s): the fused
    evidence gets it, as a model's raw outputs do: prediction.txt holds its fake_prob,
    head_prediction.txt the fused head scores, prob/ and mask/ are gated by its policy (the
    ungated maps go to ungated_prob/), and verdict.json describes it. Without it, the fused
    evidence is written as it is.
    """
    if det_weights is None and loc_weights is None:
        raise ValueError("nothing to fuse: give detection weights, localization weights or both")
    if os.path.abspath(out_dir) in {os.path.abspath(d) for d in export_dirs}:
        raise ValueError(f"{out_dir}: the output directory must differ from every input")
    names = _image_names(export_dirs, det_weights is not None)
    fused_scores, weights = _fused_evidence(export_dirs, names, det_weights, loc_weights)
    os.makedirs(out_dir, exist_ok=True)
    if weights is not None:
        os.makedirs(os.path.join(out_dir, MASK_DIR), exist_ok=True)
        os.makedirs(os.path.join(out_dir, PROB_DIR), exist_ok=True)
    single_input = None
    if weights is not None and (weights > 0).sum() == 1 and verdict is None:
        single_input = export_dirs[int(np.argmax(weights))]

    def fuse_one(name: str) -> Optional[float]:
        """Write the image's maps; return its fake_prob under ``verdict`` (None without one)."""
        file_name = mask_file_name(name)
        if single_input is not None:
            # one model carries all the weight: its files are the fused result, byte for byte
            source_prob = _ungated_prob_path(single_input, name)
            source_mask = os.path.join(single_input, MASK_DIR, file_name)
            if source_prob == _prob_path(single_input, name) and os.path.isfile(source_mask):
                shutil.copyfile(source_prob, os.path.join(out_dir, PROB_DIR, file_name))
                shutil.copyfile(source_mask, os.path.join(out_dir, MASK_DIR, file_name))
                return None
        codes = None if weights is None else _fuse_prob_codes(export_dirs, weights, name)
        fake_prob = None
        if verdict is not None:
            result = verdict(_raw_output(None if fused_scores is None else fused_scores[name], codes))
            fake_prob = float(result["fake_prob"]) if "fake_prob" in result else None
            if codes is not None and verdict.mask_policy == "gate" and not bool(result["is_fake"]):
                write_png(os.path.join(out_dir, UNGATED_PROB_DIR, file_name), codes)
                codes = np.zeros_like(codes)
        if codes is not None:
            write_png(os.path.join(out_dir, PROB_DIR, file_name), codes)
            mask = np.where(codes >= PROB_CODE_THRESHOLD, np.uint8(255), np.uint8(0))
            write_png(os.path.join(out_dir, MASK_DIR, file_name), mask)
        return fake_prob

    if verdict is not None and weights is not None:
        os.makedirs(os.path.join(out_dir, UNGATED_PROB_DIR), exist_ok=True)
    verdict_probs = list(progress_bar(iter_bounded(fuse_one, names, num_workers or default_num_workers()),
                                      len(names), progress, "fusing"))
    if verdict is not None and verdict.enabled:
        write_predictions(os.path.join(out_dir, PREDICTION_FILE), list(zip(names, verdict_probs)))
        if fused_scores is not None:
            write_predictions(os.path.join(out_dir, HEAD_PREDICTION_FILE),
                              [(name, fused_scores[name]) for name in names])
        write_verdict_description(out_dir, verdict.describe())
    elif fused_scores is not None:
        write_predictions(os.path.join(out_dir, PREDICTION_FILE), [(name, fused_scores[name]) for name in names])
    return len(names)


def calibrate_ensemble(export_dirs: Sequence[str], split_dir: str, target_fpr: float,
                       det_weights: Optional[Sequence[float]] = None,
                       loc_weights: Optional[Sequence[float]] = None,
                       rule: str = "map_max", mask_policy: str = "gate"):
    """The ensemble's own verdict, fitted as a model's is (every rule, ``calibrate_model``) on
    the fused evidence of ``export_dirs``, the members' exports of the calibration split, whose
    labels come from the labeled folder ``split_dir`` that holds those images. Returns
    (``Verdict`` set to ``rule`` and ``mask_policy``, its ``RuleFit``s)."""
    from types import SimpleNamespace

    from ..modeling.verdict import Verdict, verdict_features
    from .calibration import VerdictRecord, calibrate_model

    if det_weights is None and loc_weights is None:
        raise ValueError("nothing to fuse: give detection weights, localization weights or both")
    names = _image_names(export_dirs, det_weights is not None)
    fused_scores, weights = _fused_evidence(export_dirs, names, det_weights, loc_weights)
    split = list_ddl_split(split_dir)
    labels = dict(zip(split.names, split.labels.tolist()))
    unknown = [name for name in names if name not in labels]
    if unknown:
        raise ValueError(f"{split_dir}: holds no image named {unknown[0]} ({len(unknown)} of the "
                         f"calibration exports' {len(names)} images are not in it)")
    records = []
    for name in names:
        codes = None if weights is None else _fuse_prob_codes(export_dirs, weights, name)
        output = _raw_output(None if fused_scores is None else fused_scores[name], codes)
        records.append(VerdictRecord(name, int(labels[name]), tuple(verdict_features(output).tolist()), 0, 0, 0, 0))
    verdict = Verdict(rule, mask_policy, fused_scores is not None, weights is not None)
    fits = calibrate_model(SimpleNamespace(verdict=verdict), records, target_fpr)
    return verdict, fits


def _pair_decision_tables(normalized_grid: Sequence[np.ndarray]) -> np.ndarray:
    """For two inputs: (G, 65536) table, 1 where codes (q1, q2) fuse to a forged pixel.

    Built with the very function that fuses real maps, applied to every code pair, so looking
    the decision up is exactly what fusing the maps would give.
    """
    first, second = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8),
                                indexing="ij")
    maps = [decode_prob_u8(first), decode_prob_u8(second)]
    return np.stack([
        (encode_prob_u8(_fuse_decoded(maps, w)) >= PROB_CODE_THRESHOLD).ravel()
        for w in normalized_grid
    ]).astype(np.int64)


def _pair_counts(codes: Sequence[np.ndarray], gt: np.ndarray, decisions: np.ndarray) -> np.ndarray:
    """(G, 3) TP/FP/FN of every grid point from histograms of the image's code pairs."""
    pair = (codes[0].astype(np.intp) << 8) | codes[1]
    all_pixels = np.bincount(pair.ravel(), minlength=65536)
    forged_pixels = np.bincount(pair[gt], minlength=65536)
    tp = decisions @ forged_pixels
    predicted = decisions @ all_pixels
    return np.stack([tp, predicted - tp, int(np.count_nonzero(gt)) - tp], axis=1)


def weight_grid(num_inputs: int, step: float) -> np.ndarray:
    """All non-negative weight vectors on a grid of ``step`` that sum to 1, shape (G, N)."""
    if not 0 < step <= 1:
        raise ValueError(f"grid step must be in (0, 1], got {step}")
    units = round(1 / step)
    if abs(units * step - 1) > 1e-9:
        raise ValueError(f"grid step {step} must divide 1 (e.g. 0.1, 0.05, 0.25)")
    grid = [c for c in itertools.product(range(units + 1), repeat=num_inputs)
            if sum(c) == units]
    return np.asarray(grid, dtype=np.float64) / units


def search_weights(export_dirs: Sequence[str], split_dir: str, step: float = 0.1,
                   search_det: bool = True, search_loc: bool = True, gt_mask_threshold: int = 127,
                   num_workers: Optional[int] = None, progress: bool = False) -> Dict:
    """Grid-search each task's fusion weights on a labeled split.

    Every input must be an export of the same split. Detection weights maximize AUC,
    localization weights maximize per-image (F1 + IoU) / 2; the tasks are independent, so the
    best overall score is reached by combining the two best. Returns ``{"det": [...],
    "loc": [...], "best_det_weights", "best_loc_weights", "best"}``; each list holds one dict
    per grid point with its weights and metrics (fractions).
    """
    images = list_ddl_split(split_dir)
    grid = weight_grid(len(export_dirs), step)
    result: Dict = {"grid_step": step}
    if search_det:
        result["det"] = _score_detection_grid(export_dirs, images, grid)
    if search_loc:
        counts = _count_localization_grid(export_dirs, images, grid, gt_mask_threshold,
                                          num_workers or default_num_workers(), progress)
        result["loc"] = _score_localization_grid(images, grid, counts)
    result.update(_best_weights(result))
    return result


def _score_detection_grid(export_dirs: Sequence[str], images: SplitIndex,
                          grid: np.ndarray) -> List[Dict]:
    """AUC of the fused scores at every grid point."""
    all_scores = _read_all_scores(export_dirs)
    missing = [name for name in images.names if name not in all_scores[0]]
    if missing or len(all_scores[0]) != len(images):
        raise ValueError(f"{export_dirs[0]}: {PREDICTION_FILE} does not cover exactly the "
                         f"images of {images.split_dir} (e.g. missing {missing[:5]})")
    score_columns = [np.asarray([scores[name] for name in images.names]) for scores in all_scores]
    del all_scores  # the name -> score dicts are the big part: free them before the grid
    return [{"weights": w.tolist(), "auc": roc_auc(images.labels, fuse_predictions(score_columns, w))}
            for w in grid]


def _count_localization_grid(export_dirs: Sequence[str], images: SplitIndex, grid: np.ndarray,
                             gt_mask_threshold: int, num_workers: int,
                             progress: bool) -> np.ndarray:
    """(grid point, image, TP/FP/FN) pixel counts of the fused masks at every grid point."""
    # normalized exactly as fuse_exports will normalize the reported weights
    normalized_grid = [normalize_weights(w, len(export_dirs), "search") for w in grid]
    pair_decisions = _pair_decision_tables(normalized_grid) if len(export_dirs) == 2 else None

    def count_one(i: int) -> np.ndarray:
        image = images[i]
        shape = (image.height, image.width)
        codes = [_read_prob(d, image.name) for d in export_dirs]
        for export_dir, prob_codes in zip(export_dirs, codes):
            if prob_codes.shape != shape:
                raise ValueError(f"{os.path.join(export_dir, PROB_DIR, image.name)}: "
                                 f"probability map is {prob_codes.shape} but the image is {shape}")
        gt = read_ground_truth(image.mask_path, shape, gt_mask_threshold, image.name)
        if pair_decisions is not None:
            return _pair_counts(codes, gt, pair_decisions)
        maps = [decode_prob_u8(c) for c in codes]
        # same decision as the exported mask: fused code >= 128  <=>  fused prob > 0.5
        return np.asarray([
            mask_counts(encode_prob_u8(_fuse_decoded(maps, w)) >= PROB_CODE_THRESHOLD, gt)
            for w in normalized_grid
        ])

    # preallocated, so memory is fixed before the loop
    counts = np.zeros((len(grid), len(images), 3), dtype=np.int64)
    for i, image_counts in enumerate(progress_bar(
            iter_bounded(count_one, range(len(images)), num_workers), len(images), progress,
            "searching")):
        counts[:, i] = image_counts
    return counts


def _score_localization_grid(images: SplitIndex, grid: np.ndarray,
                             counts: np.ndarray) -> List[Dict]:
    """Per-image and pixel-level F1/IoU at every grid point from ``_count_localization_grid``."""
    num_pixels = images.sizes[:, 0].astype(np.int64) * images.sizes[:, 1]
    no_scores = np.full(len(images), np.nan)
    scored = []
    for w, point_counts in zip(grid, counts):
        metrics = compute_ddl_metrics_from_arrays(
            images.labels, no_scores, point_counts[:, 0], point_counts[:, 1], point_counts[:, 2],
            num_pixels)
        metrics.pop("num_unlabeled", None)
        scored.append({"weights": w.tolist(), **metrics})
    return scored


def _best_weights(result: Dict) -> Dict:
    """``best_det_weights``, ``best_loc_weights`` and ``best`` (the best metrics) of a search."""
    best_det = max(result.get("det", []), key=lambda r: r["auc"], default=None)
    best_loc = max(result.get("loc", []), key=lambda r: r["f1"] + r["iou"], default=None)
    summary: Dict = {}
    best: Dict[str, float] = {}
    if best_det:
        summary["best_det_weights"] = best_det["weights"]
        best["auc"] = best_det["auc"]
    if best_loc:
        summary["best_loc_weights"] = best_loc["weights"]
        best.update({k: best_loc[k] for k in ("f1", "iou", "f1_pixel", "iou_pixel")})
    if best_det and best_loc:
        best["score"] = (best["auc"] + best["f1"] + best["iou"]) / 3
    summary["best"] = best
    return summary
