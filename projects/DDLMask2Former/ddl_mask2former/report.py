"""Pictures of a training run: its learning curve and a contact sheet of val predictions.

* ``plot_learning_curve(metrics_json, out_png)``: training loss (detectron2's ``total_loss``,
  logged every ``SOLVER.LOG_PERIOD``) and the val AUC / per-image F1 / per-image IoU that the
  ``DDLEvaluator`` logged at each evaluation (``TEST.EVAL_PERIOD``), from ``metrics.json``.
* ``write_contact_sheet(export_dir, split_dir, out_png)``: one row per val image: the image
  with its ground-truth outline, and the exported prediction (``prob/`` heat map, ``mask/``
  outline, caption with ``fake_prob`` and, for fakes, the image's IoU). It reads the export
  only, so it shows exactly what was scored.
"""
import json
import os

import cv2
import numpy as np

from .data.image_io import read_forgery_mask, read_image
from .evaluation.export import (
    MASK_DIR, PREDICTION_FILE, PROB_DIR, decode_prob_u8, mask_file_name, read_gray_png, read_predictions,
    read_verdict_threshold)
from .visualization import format_caption, render_forgery_overlay

__all__ = ["read_metrics", "plot_learning_curve", "write_contact_sheet"]

# Result keys of the DDLEvaluator as detectron2's EvalHook stores them (percent).
CURVE_METRICS = (("ddl/AUC", "AUC"), ("ddl/F1", "F1 (per image)"), ("ddl/IoU", "IoU (per image)"),
                 ("ddl/real_false_alarm", "real images > 1 % marked"))
_GT_RGB = (0, 255, 0)


def read_metrics(metrics_json):
    """(training rows, evaluation rows) of a detectron2 ``metrics.json`` (one JSON per line)."""
    if not os.path.isfile(metrics_json):
        raise FileNotFoundError(f"{metrics_json}: no metrics.json (was the run's OUTPUT_DIR given?)")
    train, evaluation = [], []
    with open(metrics_json) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{metrics_json}, line {line_number}: not JSON ({exc.msg})") from None
            if "iteration" not in row:
                continue
            if any(key in row for key, _ in CURVE_METRICS):
                evaluation.append(row)
            if "total_loss" in row:
                train.append(row)
    return train, evaluation


def plot_learning_curve(metrics_json, out_png, title=None):
    """Write the learning-curve figure of a run; returns ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evaluation = read_metrics(metrics_json)
    if not train and not evaluation:
        raise ValueError(f"{metrics_json}: no training loss or evaluation rows to plot")
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        iterations = [row["iteration"] + 1 for row in train]
        loss_axis.plot(iterations, [row["total_loss"] for row in train], color="tab:gray", label="total loss")
        if all("loss_det" in row for row in train):
            det_axis = loss_axis.twinx()
            det_axis.plot(iterations, [row["loss_det"] for row in train], color="tab:purple", alpha=0.7,
                          label="detection loss (weighted)")
            det_axis.set_ylabel("detection loss", color="tab:purple")
        loss_axis.set_yscale("log")
    loss_axis.set_xlabel("iteration")
    loss_axis.set_ylabel("training loss (log scale)")
    loss_axis.set_title("training loss")
    loss_axis.grid(alpha=0.3)
    for key, label in CURVE_METRICS:
        rows = [row for row in evaluation if key in row]
        if rows:
            xs = [row["iteration"] + 1 for row in rows]
            ys = [row[key] for row in rows]
            metric_axis.plot(xs, ys, marker="o", label=label)
            metric_axis.annotate(f"{ys[-1]:.1f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4))
    metric_axis.set_ylim(0, 100)
    metric_axis.set_xlabel("iteration")
    metric_axis.set_ylabel("percent")
    metric_axis.set_title("validation")
    metric_axis.grid(alpha=0.3)
    metric_axis.legend(loc="center left")
    if train:
        metric_axis.set_xlim(0, max(row["iteration"] + 1 for row in train + evaluation) * 1.05)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


def _outline(image, mask, color, thickness):
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    canvas = image.copy()
    cv2.drawContours(canvas, contours, -1, color, thickness, lineType=cv2.LINE_AA)
    return canvas


def _fit(image, height):
    scale = height / image.shape[0]
    return cv2.resize(image, (max(1, int(round(image.shape[1] * scale))), height), interpolation=cv2.INTER_AREA)


def _label_strip(text, width, height=22):
    strip = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def write_contact_sheet(export_dir, split_dir, out_png, num_fake=6, num_real=4, row_height=200):
    """Contact sheet of the first ``num_fake`` fake and ``num_real`` real images of a labeled
    split (sorted by name), from an export of predictions on it; returns ``out_png``."""
    scores = read_predictions(os.path.join(export_dir, PREDICTION_FILE))
    threshold = read_verdict_threshold(export_dir)
    rows = []
    for label, folder, count in ((1, "fake", num_fake), (0, "real", num_real)):
        image_dir = os.path.join(split_dir, folder)
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{image_dir}: not a labeled DDL split folder")
        names = sorted(n for n in os.listdir(image_dir) if n in scores)[:count]
        for name in names:
            rows.append(_contact_row(export_dir, split_dir, folder, name, label, scores[name], threshold,
                                     row_height))
    if not rows:
        raise ValueError(f"{export_dir}: no prediction matches an image of {split_dir}")
    width = max(max(pair.shape[1] for _caption, pair in rows), 640)
    parts = [_label_strip("left: image, ground-truth outline (green)   right: mask_prob heat map, "
                          f"mask outline, verdict (FAKE when fake_prob > {threshold:.2f})", width)]
    for caption, pair in rows:
        parts += [_label_strip(caption, width),
                  np.pad(pair, ((0, 4), (0, width - pair.shape[1]), (0, 0)), constant_values=255)]
    sheet = np.concatenate(parts)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    if not cv2.imwrite(out_png, sheet[:, :, ::-1]):
        raise OSError(f"could not write {out_png}")
    return out_png


def _contact_row(export_dir, split_dir, folder, name, label, fake_prob, threshold, row_height):
    image = read_image(os.path.join(split_dir, folder, name), format="RGB")
    height, width = image.shape[:2]
    thickness = max(1, int(round(max(height, width) / 250)))
    if label:
        truth = read_forgery_mask(_mask_path(split_dir, name)) > 0
    else:
        truth = np.zeros((height, width), bool)
    prob_path = os.path.join(export_dir, PROB_DIR, mask_file_name(name))
    if os.path.isfile(prob_path):
        mask_prob = decode_prob_u8(read_gray_png(prob_path))
        predicted = mask_prob > 0.5
    else:  # an export without prob/: the binary mask is all there is
        predicted = read_gray_png(os.path.join(export_dir, MASK_DIR, mask_file_name(name))) > 127
        mask_prob = predicted.astype(np.float32)
    prediction = render_forgery_overlay(image, mask_prob, predicted, fake_prob, threshold=threshold)
    verdict = f"{format_caption(fake_prob, threshold=threshold)}"
    if label:
        union = np.logical_or(truth, predicted).sum()
        iou = np.logical_and(truth, predicted).sum() / union if union else 1.0
        caption = f"{folder} {name}: {verdict}, IoU {iou:.2f}"
    else:
        caption = f"{folder} {name}: {verdict}, {100 * predicted.mean():.1f}% marked forged"
    pair = np.concatenate([_fit(_outline(image, truth, _GT_RGB, thickness), row_height),
                           np.full((row_height, 4, 3), 255, np.uint8), _fit(prediction, row_height)], axis=1)
    return caption, pair


def _mask_path(split_dir, name):
    for folder in ("masks", "mask"):
        path = os.path.join(split_dir, folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{split_dir}: no masks/{name} or mask/{name} for the fake image {name}")
