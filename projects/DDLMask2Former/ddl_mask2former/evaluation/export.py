"""Challenge submission export: ``prediction.txt``, ``mask/``, ``prob/`` and the zip.

Layout of an export directory::

    prediction.txt        one "image_name.png,score" line per image, sorted by name
    mask/<stem>.png       predicted forgery mask, 0 (real pixel) / 255 (forged), original size
    prob/<stem>.png       8-bit forgery probability map (encoding below), original size
    submission.zip        optional: prediction.txt + mask/ as the challenge accepts them
    verdict.json          the verdict that made the scores: rule, calibration, threshold, mask policy
    head_prediction.txt   the detection head's probability before the verdict, as prediction.txt
    ungated_prob/<stem>.png  the map before the gate, for the images whose map the gate emptied

The last two hold the evidence before the verdict, which an ensemble fuses (``fusion.py``):
an image's ungated map is ``ungated_prob/`` where it exists, else ``prob/``.

Scores are written with Python's shortest round-trip ``repr`` of the float64 value, so the
offline scorer reads back exactly the numbers the in-process evaluator scored.

8-bit probability encoding. Code ``q`` stands for the interval ``(q/256, (q+1)/256]``:
``q = clip(ceil(256 * p) - 1, 0, 255)`` and it decodes to the interval centre
``(q + 0.5) / 256``. With this choice ``q >= 128`` holds exactly when ``p > 0.5``, the
protocol's threshold, so ``mask/`` always equals ``prob/ >= 128`` and thresholding a decoded
map at 0.5 gives the same mask again (``256 * p`` is exact in binary floating point, so no
rounding can move a pixel across the threshold).
"""
import json
import logging
import math
import os
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, Tuple

import cv2
import numpy as np
import torch

__all__ = [
    "PROB_THRESHOLD",
    "PROB_CODE_THRESHOLD",
    "PREDICTION_FILE",
    "MASK_DIR",
    "PROB_DIR",
    "ZIP_FILE",
    "VERDICT_FILE",
    "HEAD_PREDICTION_FILE",
    "UNGATED_PROB_DIR",
    "write_verdict_description",
    "read_verdict_threshold",
    "encode_prob_u8",
    "decode_prob_u8",
    "mask_file_name",
    "format_prediction_line",
    "read_predictions",
    "write_predictions",
    "write_png",
    "read_gray_png",
    "ExportWriter",
    "write_submission_zip",
]

logger = logging.getLogger(__name__)

# the challenge's localization threshold on the forgery probability
PROB_THRESHOLD = 0.5
# smallest 8-bit code whose interval lies above PROB_THRESHOLD: q >= 128  <=>  p > 0.5
PROB_CODE_THRESHOLD = 128
PREDICTION_FILE = "prediction.txt"
MASK_DIR = "mask"
PROB_DIR = "prob"
ZIP_FILE = "submission.zip"
# The detection head's scores before the verdict, and the maps the gate emptied (for ensembles).
HEAD_PREDICTION_FILE = "head_prediction.txt"
UNGATED_PROB_DIR = "ungated_prob"
# The verdict's rule, calibration, threshold and mask policy (modeling/verdict.py), as JSON.
VERDICT_FILE = "verdict.json"


def encode_prob_u8(prob) -> np.ndarray:
    """Forgery probabilities in [0, 1] (numpy array or torch tensor) -> uint8 codes (numpy)."""
    if isinstance(prob, torch.Tensor):
        prob = prob.detach()
        if not prob.is_floating_point():
            raise TypeError(f"probabilities must be floating point, got {prob.dtype}")
        if prob.numel() and not bool(prob.isfinite().all()):
            raise ValueError("probability map contains NaN or inf")
        # encode where the tensor lives (GPU at inference) and copy back one byte per pixel
        codes = (prob.float() * 256).ceil_().sub_(1).clamp_(0, 255)
        return codes.to(torch.uint8).cpu().numpy()
    prob = np.asarray(prob)
    if not np.issubdtype(prob.dtype, np.floating):
        raise TypeError(f"probabilities must be floating point, got {prob.dtype}")
    if prob.size and not np.isfinite(prob).all():
        raise ValueError("probability map contains NaN or inf")
    codes = np.ceil(prob * 256) - 1
    return np.clip(codes, 0, 255).astype(np.uint8)


def decode_prob_u8(codes: np.ndarray) -> np.ndarray:
    """uint8 codes -> float32 probabilities at the centre of each code's interval."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"probability codes must be uint8, got {codes.dtype}")
    return (codes.astype(np.float32) + np.float32(0.5)) / np.float32(256)


def mask_file_name(image_name: str) -> str:
    """File name of an image's mask/prob PNG: its stem with a .png extension."""
    return os.path.splitext(os.path.basename(image_name))[0] + ".png"


def format_prediction_line(image_name: str, score: float) -> str:
    if "," in image_name or "\n" in image_name:
        raise ValueError(f"image name {image_name!r} cannot be written to {PREDICTION_FILE}")
    return f"{image_name},{float(score)!r}\n"


def write_predictions(path: str, scores: Iterable[Tuple[str, float]]) -> None:
    """Write "name,score" lines sorted by name; atomically, through a temporary file."""
    temp_path = path + ".tmp"
    with open(temp_path, "w") as f:
        for name, score in sorted(scores):
            f.write(format_prediction_line(name, score))
    os.replace(temp_path, path)


def read_predictions(path: str) -> Dict[str, float]:
    """Parse a prediction.txt into {image_name: score}; errors name the line and the image.

    Scores are probabilities: values outside [0, 1] are kept as they are (AUC only ranks them)
    but warned about once per file, naming the first such line and how many there are.
    """
    scores: Dict[str, float] = {}
    num_out_of_range, first_out_of_range = 0, None
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            name, sep, value = line.rpartition(",")
            name = name.strip()
            where = f"{path}, line {line_number}"
            if not sep or not name:
                raise ValueError(f"{where}: expected 'image_name.png,score', got {line!r}")
            try:
                score = float(value)
            except ValueError:
                raise ValueError(f"{where}: score of {name} is not a number: {value!r}") from None
            if not math.isfinite(score):
                raise ValueError(f"{where}: score of {name} is {value.strip()}, not finite")
            if name in scores:
                raise ValueError(f"{where}: {name} has a second score")
            if not 0.0 <= score <= 1.0:
                num_out_of_range += 1
                first_out_of_range = first_out_of_range or (line_number, name, value.strip())
            scores[name] = score
    if num_out_of_range:
        line_number, name, value = first_out_of_range
        logger.warning("%s, line %d: score of %s is %s, outside [0, 1] (%d such score(s) in this "
                       "file); scored as given, but scores should be forgery probabilities",
                       path, line_number, name, value, num_out_of_range)
    return scores


def write_png(path: str, image: np.ndarray) -> None:
    if not cv2.imwrite(path, image):
        raise OSError(f"could not write {path}")


def read_gray_png(path: str) -> np.ndarray:
    """Read an 8-bit single-channel PNG; errors name the file."""
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: missing or not a readable image")
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected an 8-bit single-channel PNG, got shape {image.shape} "
            f"dtype {image.dtype}"
        )
    return image


class ExportWriter:
    """Writes mask/ and prob/ PNGs on background threads so inference does not wait on disk.

    At most ``max_pending`` images are queued; ``flush()`` waits for all of them and re-raises
    the first write error. Scores are not written here (the evaluator gathers them from every
    process and writes one prediction.txt).
    """

    def __init__(self, export_dir: str, write_prob: bool = True, num_threads: int = 2,
                 max_pending: int = 16):
        self.export_dir = export_dir
        self.write_prob = write_prob
        os.makedirs(os.path.join(export_dir, MASK_DIR), exist_ok=True)
        if write_prob:
            os.makedirs(os.path.join(export_dir, PROB_DIR), exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=num_threads,
                                        thread_name_prefix="ddl-export")
        self._pending = deque()
        self._max_pending = max_pending

    def submit(self, image_name: str, prob_codes: np.ndarray) -> None:
        """Queue the mask and probability PNGs of one image from its uint8 probability codes."""
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, mask_file_name(image_name),
                                               prob_codes))

    def submit_mask(self, image_name: str, mask: np.ndarray) -> None:
        """Queue a mask-only export (a model that outputs a mask but no probabilities)."""
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        codes = np.where(mask, np.uint8(255), np.uint8(0))
        self._pending.append(self._pool.submit(self._write, mask_file_name(image_name), codes,
                                               False))

    def submit_ungated(self, image_name: str, prob_codes: np.ndarray) -> None:
        """Queue ``ungated_prob/<stem>.png``: the map of an image before the gate emptied it."""
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        path = os.path.join(self.export_dir, UNGATED_PROB_DIR, mask_file_name(image_name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._pending.append(self._pool.submit(write_png, path, prob_codes))

    def _write(self, file_name: str, prob_codes: np.ndarray, with_prob: bool = True) -> None:
        mask = np.where(prob_codes >= PROB_CODE_THRESHOLD, np.uint8(255), np.uint8(0))
        write_png(os.path.join(self.export_dir, MASK_DIR, file_name), mask)
        if self.write_prob and with_prob:
            write_png(os.path.join(self.export_dir, PROB_DIR, file_name), prob_codes)

    def flush(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)


def write_submission_zip(export_dir: str, zip_path: str = None) -> str:
    """Zip prediction.txt and mask/ (the challenge's format) and return the zip's path."""
    zip_path = zip_path or os.path.join(export_dir, ZIP_FILE)
    prediction_path = os.path.join(export_dir, PREDICTION_FILE)
    mask_dir = os.path.join(export_dir, MASK_DIR)
    with zipfile.ZipFile(zip_path + ".tmp", "w") as archive:
        if os.path.exists(prediction_path):
            archive.write(prediction_path, PREDICTION_FILE, compress_type=zipfile.ZIP_DEFLATED)
        if os.path.isdir(mask_dir):
            # PNGs are already compressed: store them
            for name in sorted(os.listdir(mask_dir)):
                archive.write(os.path.join(mask_dir, name), f"{MASK_DIR}/{name}",
                              compress_type=zipfile.ZIP_STORED)
    os.replace(zip_path + ".tmp", zip_path)
    return zip_path


def write_verdict_description(export_dir: str, description: Dict) -> str:
    """Write ``Verdict.describe()`` to ``export_dir/verdict.json``; returns the path."""
    path = os.path.join(export_dir, VERDICT_FILE)
    with open(path, "w") as f:
        json.dump(description, f, indent=2)
    return path


def read_verdict_threshold(export_dir: str, default: float = 0.5) -> float:
    """The verdict threshold an export was made with (``default`` when it has no verdict.json)."""
    path = os.path.join(export_dir, VERDICT_FILE)
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        try:
            return float(json.load(f)["threshold"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a verdict description ({exc})") from exc
