"""``ExportedModel`` and ``ExportedPredictor``: an exported DDL-Mask2Former run with ONNX Runtime,
numpy and Pillow only (no torch, no detectron2).

The ONNX file maps a normalized (B, C, H, W) float32 batch to ``fake_logit`` (B,) and
``mask_prob`` (B, H, W) at the input size. Everything around it is configured by the settings
JSON that ``tools/export_model.py`` writes beside the file (``<file>.json``): the test resize,
channel order and normalization, tiling with blending, flip, the verdict and the mask gate.
The rules are the ones ``DDLMask2Former.predict`` applies (``rules.py``); the parity tests
(tests/test_serve_runtime.py) hold this runtime to the PyTorch model within 1e-4 on
``mask_prob`` and 1e-5 on ``fake_prob``.

A ``torch.export`` program (``.pt2``) runs through the same code when a network function is
passed in (``ddl_mask2former.deploy.load_exported`` does; that one needs torch).
"""
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import rules
from .images import ImageLimits, NO_LIMITS, base_scale_size, load_image, resize_bilinear, resize_rgb

__all__ = ["ExportedModel", "ExportedModelError", "ExportedPredictor", "settings_path", "read_settings",
           "SETTINGS_VERSION"]

# The settings JSON's layout version: 2 adds the verdict's top_fraction, area_floor and eps;
# 3 replaces eps by prob_floor and prob_ceiling (the log odds are no longer clamped to
# [eps, 1 - eps]: only a float32 0 or 1 takes a bound, rules.PROB_FLOOR and rules.PROB_CEILING).
SETTINGS_VERSION = 3
# What version-1 files were written with (those constants were not in the JSON then).
_VERSION_1_VERDICT_CONSTANTS = {"top_fraction": 0.005, "area_floor": 1e-4, "eps": 1e-6}
_VERDICT_KEYS = ("rule", "features", "intercept", "threshold", "mask_policy", "top_fraction", "area_floor",
                 "prob_floor", "prob_ceiling")


def _upgrade_verdict(verdict: Dict, version: int) -> Dict:
    """A verdict entry of an older settings file in the current layout. A version-1 or -2 file's
    verdict was fitted on log odds clamped to [eps, 1 - eps] (eps 1e-6 in version 1), so its
    bounds stay there (prob_floor = eps, prob_ceiling = 1 - eps); the rest of its rules are the
    current ones (fake_prob is the float64 value that is_fake compares)."""
    if version >= 3:
        return verdict
    if version < 2:
        verdict = dict(_VERSION_1_VERDICT_CONSTANTS, **verdict)
    if "eps" not in verdict:
        return verdict  # reported as missing prob_floor/prob_ceiling
    eps = float(verdict["eps"])
    upgraded = {key: value for key, value in verdict.items() if key != "eps"}
    return dict(upgraded, prob_floor=eps, prob_ceiling=1.0 - eps)

# (done, total) units of work of one image: tiles (and the global view), or 1 whole image.
Progress = Callable[[int, int], None]
# normalized (B, C, H, W) float32 -> the outputs in the settings' "outputs" order
Network = Callable[[np.ndarray], Sequence[np.ndarray]]


class ExportedModelError(ValueError):
    """An exported file, its settings JSON, or an input that the exported network cannot take."""


def settings_path(exported_file) -> str:
    """The JSON written beside an exported file: ``<file>.json``."""
    return os.fspath(exported_file) + ".json"


def read_settings(exported_file) -> Dict:
    """The settings JSON of ``exported_file``, checked; errors name the file and the key."""
    path = settings_path(exported_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{exported_file}: its settings file {path} is missing (tools/export_model.py "
                                "writes it beside the exported file)")
    try:
        with open(path) as handle:
            settings = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ExportedModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise ExportedModelError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    try:
        for key in ("format", "input", "outputs", "tasks", "test_resize", "tiling", "flip", "verdict"):
            settings[key]
        for key in ("channel_order", "channels", "pixel_mean", "pixel_std", "size"):
            settings["input"][key]
    except KeyError as exc:
        raise ExportedModelError(f"{path}: missing key {exc}; re-export with tools/export_model.py") from None
    verdict = settings["verdict"]
    version = settings.get("metadata_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ExportedModelError(f"{path}: metadata_version {version!r} is not a version number")
    if version > SETTINGS_VERSION:
        raise ExportedModelError(f"{path}: metadata_version {version} is newer than this runtime reads "
                                 f"({SETTINGS_VERSION}); update ddl-mask2former")
    if verdict is not None:
        verdict = settings["verdict"] = _upgrade_verdict(verdict, version)
        missing = [k for k in _VERDICT_KEYS if k not in verdict]
        if missing:
            raise ExportedModelError(f"{path}: verdict lacks {missing}; re-export with tools/export_model.py")
        if verdict["rule"] not in rules.RULES or verdict["mask_policy"] not in rules.MASK_POLICIES:
            raise ExportedModelError(f"{path}: unknown verdict rule {verdict['rule']!r} or mask policy "
                                     f"{verdict['mask_policy']!r}")
    tiling = settings["tiling"]
    if tiling is not None and tiling.get("fake_prob_rule") not in rules.FAKE_PROB_RULES:
        raise ExportedModelError(f"{path}: unknown tiling fake_prob_rule {tiling.get('fake_prob_rule')!r} "
                                 f"(known: {sorted(rules.FAKE_PROB_RULES)})")
    return settings


def _onnx_network(path: str, output_names: List[str], input_name: str, providers, num_threads) -> Network:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"{path} is an ONNX file and onnxruntime is not installed: "
                          "pip install ddl-mask2former[serve]") from None
    options = onnxruntime.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads = int(num_threads)
    try:
        session = onnxruntime.InferenceSession(path, options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # ONNX Runtime raises its own exception types for a bad file
        raise ExportedModelError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
    return lambda normalized: session.run(output_names, {input_name: normalized})


class ExportedModel:
    """The exported network in ``path`` with the rules of ``<path>.json``.

    Args:
        path: the ``.onnx`` file written by ``tools/export_model.py``.
        providers: ONNX Runtime execution providers (default ``["CPUExecutionProvider"]``).
        num_threads: ONNX Runtime intra-op threads (default: its own choice).
        network: run this function instead of an ONNX Runtime session (how a ``.pt2`` program
            runs; ``ddl_mask2former.deploy.load_exported`` passes it).
    """

    def __init__(self, path, providers: Optional[Sequence[str]] = None, num_threads: Optional[int] = None,
                 network: Optional[Network] = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"exported model not found: {self.path}")
        self.settings = read_settings(self.path)
        settings, spec = self.settings, self.settings["input"]
        self.format = settings["format"]
        self.input_format = spec["channel_order"]
        self.channels = int(spec["channels"])
        self.fixed_size = tuple(spec["size"]) if spec["size"] is not None else None
        self.output_names = list(settings["outputs"])
        self.tasks = tuple(settings["tasks"])
        self.test_resize = settings["test_resize"]
        self.tiling = settings["tiling"]
        self.flip = bool(settings["flip"])
        # A verdict that the model's tasks cannot run ("enabled": false) passes outputs through.
        verdict = settings["verdict"]
        self.verdict = verdict if verdict is not None and verdict.get("enabled", True) else None
        self.pixel_mean = np.asarray(spec["pixel_mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.pixel_std = np.asarray(spec["pixel_std"], dtype=np.float32).reshape(-1, 1, 1)
        if network is not None:
            self._run = network
        elif self.format == "onnx":
            self._run = _onnx_network(self.path, self.output_names, spec.get("name", "normalized"), providers,
                                      num_threads)
        else:
            raise ExportedModelError(f"{self.path} is a {self.format!r} file; the torch-free runtime runs ONNX "
                                     "files (export with --format onnx), ForgeryPredictor.from_exported runs "
                                     "this one with torch")

    @property
    def detection(self) -> bool:
        return "detection" in self.tasks

    @property
    def localization(self) -> bool:
        return "localization" in self.tasks

    @property
    def threshold(self) -> float:
        """``fake_prob`` above which an image is called fake (0.5 without a verdict)."""
        return float(self.verdict["threshold"]) if self.verdict is not None else 0.5

    @property
    def target_fpr(self) -> Optional[float]:
        """False-positive rate on real images the threshold was calibrated at (None: uncalibrated)."""
        return None if self.verdict is None else self.verdict.get("target_fpr")

    def work_units(self, height: int, width: int) -> int:
        """How many network calls (tiles, global view) ``predict`` makes for an image of this size."""
        if self.tiling is None:
            return 1
        size, overlap = int(self.tiling["tile_size"]), int(self.tiling["overlap"])
        if height <= size and width <= size:
            tiles = 1
        else:
            tiles = len(rules.tile_starts(height, size, overlap)) * len(rules.tile_starts(width, size, overlap))
        return tiles + (1 if self.tiling["fake_prob_rule"] in rules.RULES_WITH_GLOBAL_VIEW and self.detection else 0)

    def network(self, normalized: np.ndarray) -> Dict[str, np.ndarray]:
        """(B, C, H, W) normalized float32 batch -> {"fake_logit": (B,), "mask_prob": (B, H, W)}."""
        if normalized.ndim != 4 or normalized.shape[1] != self.channels:
            raise ExportedModelError(f"{self.path} takes a (batch, {self.channels}, height, width) array, got "
                                     f"{tuple(normalized.shape)}")
        if self.fixed_size is not None and tuple(normalized.shape[-2:]) != self.fixed_size:
            raise ExportedModelError(
                f"{self.path} was exported ({self.format}) for {self.fixed_size[0]}x{self.fixed_size[1]} inputs "
                f"only and got {normalized.shape[-2]}x{normalized.shape[-1]}: export to ONNX for any size, or "
                f"re-export with --size {normalized.shape[-2]} {normalized.shape[-1]}")
        outputs = self._run(np.ascontiguousarray(normalized, dtype=np.float32))
        return dict(zip(self.output_names, outputs))

    def predict(self, rgb: np.ndarray, progress: Optional[Progress] = None) -> Dict:
        """One uint8 HxWx3 RGB image -> {"fake_prob": float, "is_fake": bool, "mask_prob": HxW
        float32, "mask": HxW bool} at its size, as ``DDLMask2Former.predict`` (keys of a task the
        model lacks are absent; with a verdict, ``fake_prob`` is the float64 value ``is_fake``
        compares, else the network's float32 one). ``progress(done, total)`` is called after each
        network call."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ExportedModelError(f"predict takes a uint8 HxWx3 RGB array, got {rgb.dtype} {rgb.shape}")
        height, width = rgb.shape[:2]
        total = self.work_units(height, width)
        done = [0]

        def step(count=1):
            done[0] += count
            if progress is not None:
                progress(min(done[0], total), total)

        pixels = self._network_pixels(rgb)
        if self.tiling is None:
            if self.test_resize is not None:
                new_h, new_w = base_scale_size(height, width, self.test_resize["base_scale"],
                                               enlarge=self.test_resize["enlarge"])
                pixels = resize_rgb(pixels, new_h, new_w)
            output = self._predict_views([pixels], (height, width))[0]
            step()
        else:
            output = self._predict_tiled(pixels, step)
        if self.verdict is not None:
            output = rules.apply_verdict(output, self.verdict)
        if "mask_prob" in output:
            output["mask"] = output["mask_prob"] > 0.5
        return output

    def _network_pixels(self, rgb: np.ndarray) -> np.ndarray:
        return rgb[:, :, ::-1] if self.input_format == "BGR" else rgb

    def _predict_views(self, images: List[np.ndarray], output_size=None) -> List[Dict]:
        """Same-size HxWx3 uint8 images -> outputs at ``output_size`` (default: their size),
        averaged with their mirror images' when the settings ask for flip."""
        batch = np.stack(images).transpose(0, 3, 1, 2)
        if self.flip:
            batch = np.concatenate([batch, batch[..., ::-1]])
        normalized = (batch.astype(np.float32) - self.pixel_mean) / self.pixel_std
        outputs = self.network(normalized)
        results = [self._output(outputs, row, output_size) for row in range(len(batch))]
        if not self.flip:
            return results
        count = len(images)
        return [rules.average_with_mirrored(a, b) for a, b in zip(results[:count], results[count:])]

    def _output(self, outputs: Dict[str, np.ndarray], row: int, output_size) -> Dict:
        result = {}
        if self.detection:
            logit = np.float32(outputs["fake_logit"][row])
            result["fake_prob"] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logit))
        if self.localization:
            mask_prob = outputs["mask_prob"][row].astype(np.float32, copy=False)
            if output_size is not None and mask_prob.shape != tuple(output_size):
                mask_prob = resize_bilinear(mask_prob, *output_size)
            result["mask_prob"] = np.clip(mask_prob, 0.0, 1.0)
        return result

    def _predict_tiled(self, pixels: np.ndarray, step) -> Dict:
        tiling = self.tiling
        size, overlap = int(tiling["tile_size"]), int(tiling["overlap"])
        batch_size = int(tiling["batch_size"])
        height, width = pixels.shape[:2]
        uses_global = tiling["fake_prob_rule"] in rules.RULES_WITH_GLOBAL_VIEW
        if height <= size and width <= size:
            output = self._predict_views([pixels])[0]
            step()
            tile_fake_probs = None if "fake_prob" not in output else np.asarray([output["fake_prob"]])
            mask_prob = output.get("mask_prob")
        else:
            ys, xs = rules.tile_starts(height, size, overlap), rules.tile_starts(width, size, overlap)
            tile_h, tile_w = min(size, height), min(size, width)
            weights_y = [rules.tile_weights(height, y, tile_h, overlap) for y in ys]
            weights_x = [rules.tile_weights(width, x, tile_w, overlap) for x in xs]
            positions = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
            mask_prob = np.zeros((height, width), dtype=np.float32) if self.localization else None
            fake_probs = []
            for first in range(0, len(positions), batch_size):
                batch = positions[first:first + batch_size]
                tiles = [pixels[ys[iy]:ys[iy] + tile_h, xs[ix]:xs[ix] + tile_w] for iy, ix in batch]
                for (iy, ix), output in zip(batch, self._predict_views(tiles)):
                    if "fake_prob" in output:
                        fake_probs.append(output["fake_prob"])
                    if mask_prob is not None:
                        weight = weights_y[iy][:, None] * weights_x[ix][None, :]
                        mask_prob[ys[iy]:ys[iy] + tile_h, xs[ix]:xs[ix] + tile_w] += output["mask_prob"] * weight
                step(len(batch))
            if mask_prob is not None:
                mask_prob /= rules.blend_normalizers(height, ys, weights_y)[:, None]
                mask_prob /= rules.blend_normalizers(width, xs, weights_x)[None, :]
                np.clip(mask_prob, 0.0, 1.0, out=mask_prob)
            tile_fake_probs = np.asarray(fake_probs, dtype=np.float32) if fake_probs else None
        output = {}
        if tile_fake_probs is not None:
            global_fake_prob = None
            if uses_global:
                new_h, new_w = base_scale_size(height, width, tiling["base_scale"],
                                               enlarge=tiling["base_scale_enlarge"])
                global_fake_prob = self._predict_views([resize_rgb(pixels, new_h, new_w)])[0]["fake_prob"]
                step()
            output["fake_prob"] = np.float32(rules.FAKE_PROB_RULES[tiling["fake_prob_rule"]](tile_fake_probs,
                                                                                           global_fake_prob))
        if mask_prob is not None:
            output["mask_prob"] = mask_prob
        return output


ImageInput = Union[str, os.PathLike, bytes, np.ndarray, "Image.Image"]  # noqa: F821


class ExportedPredictor:
    """An exported model applied to images, called like ``ForgeryPredictor``.

    ``predictor(image)`` returns one dict, ``predictor([image, ...])`` a list, in order. An image
    is a file path, a uint8 numpy array (HxWx3 RGB unless ``format="BGR"``, or grayscale HxW /
    HxWx1) or a PIL image. Each dict: ``fake_prob`` (float, calibrated), ``is_fake`` (bool,
    ``fake_prob > self.threshold``), ``mask_prob`` (HxW float32 in [0, 1]) and ``mask`` (HxW
    bool), at the image's original size; keys of a task the model lacks are absent.
    """

    def __init__(self, path, providers=None, num_threads=None, network: Optional[Network] = None,
                 limits: ImageLimits = NO_LIMITS):
        self.model = ExportedModel(path, providers=providers, num_threads=num_threads, network=network)
        self.limits = limits

    @property
    def threshold(self) -> float:
        return self.model.threshold

    @property
    def target_fpr(self) -> Optional[float]:
        return self.model.target_fpr

    @property
    def calibrated(self) -> bool:
        verdict = self.model.verdict
        return verdict is not None and bool(verdict.get("calibrated", verdict.get("target_fpr") is not None))

    def __call__(self, images, format: str = "RGB", progress: Optional[Progress] = None):
        batched = isinstance(images, (list, tuple))
        sources = list(images) if batched else [images]
        results = []
        for index, source in enumerate(sources):
            name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else (
                f"input {index}" if batched else "input image")
            rgb = load_image(source, format=format, name=name, limits=self.limits)
            results.append(to_plain(self.model.predict(rgb, progress)))
        return results if batched else results[0]


def to_plain(output: Dict) -> Dict:
    """Python float / bool scalars and numpy maps, the predictor's output types."""
    result = {}
    if "fake_prob" in output:
        result["fake_prob"] = float(output["fake_prob"])
    if "is_fake" in output:
        result["is_fake"] = bool(output["is_fake"])
    if "mask_prob" in output:
        result["mask_prob"] = output["mask_prob"]
        result["mask"] = output["mask_prob"] > 0.5
    return result


def forged_fraction(mask: np.ndarray) -> float:
    """Share of pixels marked forged, in [0, 1]."""
    return float(np.count_nonzero(mask)) / float(mask.size) if mask.size else 0.0


