"""``ExportedModel``: ``DDLMask2Former.predict`` with the network run from an exported file.

The file (ONNX through ONNX Runtime, or a ``torch.export`` program) maps a normalized batch
to ``fake_logit`` and ``mask_prob`` at the input size; everything around it is the PyTorch
model's own code, configured from the JSON beside the file (``export.metadata_path``):
normalization, the mirrored views of flip TTA (``meta_arch._average_with_mirrored``), the
resize of the map to the original image size, ``TiledInference`` and the ``Verdict``. Neither
the model's modules nor the compiled deformable-attention op are built or loaded.

Called like the model in eval mode: a list of ``{"image": (C, H, W) uint8 tensor in the
network's channel order, "height", "width"}`` dicts in, one output dict each out.
"""
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..modeling.meta_arch import _average_with_mirrored, predict_whole_images
from ..modeling.tiled_inference import TiledInference
from ..modeling.verdict import Verdict
from .export import FORMATS, INPUT_NAME, metadata_path

__all__ = ["ExportedModel", "ExportedModelError"]


class ExportedModelError(ValueError):
    """An exported file, its JSON, or an input that the exported network cannot take."""


class ExportedModel:
    """The exported network in ``path`` with the settings of ``<path>.json``.

    Args:
        path: the ``.onnx`` or ``.pt2`` file written by ``tools/export_model.py``.
        providers: ONNX Runtime execution providers (default ``["CPUExecutionProvider"]``).
        num_threads: ONNX Runtime intra-op threads (default: its own choice).
    """

    def __init__(self, path, providers: Optional[Sequence[str]] = None, num_threads: Optional[int] = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"exported model not found: {self.path}")
        json_path = metadata_path(self.path)
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"{self.path}: its settings file {json_path} is missing (tools/export_model.py "
                                    "writes it beside the exported file)")
        try:
            with open(json_path) as handle:
                self.metadata = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ExportedModelError(f"{json_path}: not valid JSON ({exc})") from None
        meta = self.metadata
        try:
            self.format = meta["format"]
            spec = meta["input"]
            self.input_format = spec["channel_order"]
            self.channels = int(spec["channels"])
            self.fixed_size = tuple(spec["size"]) if spec["size"] is not None else None
            self.output_names = list(meta["outputs"])
            self.tasks = tuple(meta["tasks"])
            self.test_resize = meta["test_resize"]
            self.flip = bool(meta["flip"])
            pixel_mean, pixel_std = spec["pixel_mean"], spec["pixel_std"]
        except KeyError as exc:
            raise ExportedModelError(f"{json_path}: missing key {exc}; re-export with tools/export_model.py") from None
        if self.format not in FORMATS:
            raise ExportedModelError(f"{json_path}: unknown format {self.format!r} (expected one of {sorted(FORMATS)})")
        self.pixel_mean = torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1)
        self.pixel_std = torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1)
        self.tiling = None if meta["tiling"] is None else TiledInference(**meta["tiling"])
        self.verdict = _verdict_from_metadata(meta.get("verdict"), self.tasks)
        self._run = self._onnx_runner(providers, num_threads) if self.format == "onnx" else self._program_runner()

    @property
    def detection(self) -> bool:
        return "detection" in self.tasks

    @property
    def localization(self) -> bool:
        return "localization" in self.tasks

    def _onnx_runner(self, providers, num_threads):
        try:
            import onnxruntime
        except ImportError:
            raise ImportError(f"{self.path} is an ONNX file and onnxruntime is not installed: "
                              "pip install -e .[deploy] (or pip install -r requirements/deploy.txt)") from None
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        try:
            session = onnxruntime.InferenceSession(self.path, options,
                                                   providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # ONNX Runtime raises its own exception types for a bad file
            raise ExportedModelError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from exc

        def run(normalized: torch.Tensor) -> List[torch.Tensor]:
            outputs = session.run(self.output_names, {INPUT_NAME: normalized.numpy()})
            return [torch.from_numpy(output) for output in outputs]

        return run

    def _program_runner(self):
        try:
            program = torch.export.load(self.path)
        except Exception as exc:  # torch.export.load raises several types for a bad file
            raise ExportedModelError(f"{self.path}: torch.export.load cannot read it ({exc})") from exc
        module = program.module()

        def run(normalized: torch.Tensor) -> List[torch.Tensor]:
            with torch.no_grad():
                outputs = module(normalized)
            return list(outputs)

        return run

    def network(self, normalized: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, C, H, W) normalized float32 batch -> {"fake_logit": (B,), "mask_prob": (B, H, W)}."""
        if normalized.dim() != 4 or normalized.shape[1] != self.channels:
            raise ExportedModelError(f"{self.path} takes a (batch, {self.channels}, height, width) tensor, got "
                                     f"{tuple(normalized.shape)}")
        if self.fixed_size is not None and tuple(normalized.shape[-2:]) != self.fixed_size:
            raise ExportedModelError(
                f"{self.path} was exported ({self.format}) for {self.fixed_size[0]}x{self.fixed_size[1]} inputs "
                f"only and got {normalized.shape[-2]}x{normalized.shape[-1]}: export to ONNX for any size, or "
                f"re-export with --size {normalized.shape[-2]} {normalized.shape[-1]}")
        outputs = self._run(normalized.float().contiguous())
        return dict(zip(self.output_names, outputs))

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        return self.predict(batched_inputs)

    def predict(self, batched_inputs: List[Dict]) -> List[Dict]:
        """As ``DDLMask2Former.predict``: tiled or whole inputs, then the verdict."""
        return predict_whole_images(batched_inputs, self.predict_views, self.tiling, self.verdict)

    def predict_views(self, batched_inputs: List[Dict]) -> List[Dict]:
        """As ``DDLMask2Former.predict_views``; inputs of different sizes run in separate batches."""
        if not self.flip:
            return self._inference(batched_inputs)
        mirrored = [dict(record, image=record["image"].flip(-1)) for record in batched_inputs]
        outputs = self._inference(list(batched_inputs) + mirrored)
        count = len(batched_inputs)
        return [_average_with_mirrored(output, mirrored_output)
                for output, mirrored_output in zip(outputs[:count], outputs[count:])]

    def _inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        by_size = defaultdict(list)
        for index, record in enumerate(batched_inputs):
            image = record.get("image")
            if image is None or image.dim() != 3 or image.shape[0] != self.channels:
                shape = None if image is None else tuple(image.shape)
                raise ExportedModelError(f"input {index} ({record.get('file_name', 'no file_name')}): 'image' must be "
                                         f"a ({self.channels}, H, W) tensor for {self.path}, got {shape}")
            by_size[tuple(image.shape)].append(index)
        results: List[Dict] = [{} for _ in batched_inputs]
        for indices in by_size.values():
            pixels = torch.stack([batched_inputs[i]["image"] for i in indices]).float()
            outputs = self.network((pixels - self.pixel_mean) / self.pixel_std)
            for row, index in enumerate(indices):
                results[index] = self._output(batched_inputs[index], outputs, row)
        return results

    def _output(self, record: Dict, outputs: Dict[str, torch.Tensor], row: int) -> Dict:
        result = {}
        if self.detection:
            result["fake_prob"] = outputs["fake_logit"][row].float().sigmoid()
        if self.localization:
            mask_prob = outputs["mask_prob"][row].float()
            output_size = (int(record.get("height", mask_prob.shape[0])), int(record.get("width", mask_prob.shape[1])))
            if tuple(mask_prob.shape) != output_size:
                mask_prob = F.interpolate(mask_prob[None, None], size=output_size, mode="bilinear",
                                          align_corners=False)[0, 0]
            mask_prob = mask_prob.clamp(0.0, 1.0)
            result["mask_prob"] = mask_prob
            result["mask"] = mask_prob > 0.5
        return result


def _verdict_from_metadata(described: Optional[Dict], tasks) -> Optional[Verdict]:
    """The ``Verdict`` that ``Verdict.describe()`` (plus ``enabled``) wrote into the JSON."""
    if described is None:
        return None
    verdict = Verdict(described["rule"], described["mask_policy"], "detection" in tasks, "localization" in tasks)
    if described["calibrated"]:
        verdict.set_calibration(described["rule"], described["features"], described["intercept"],
                                described["threshold"], described["target_fpr"])
    else:
        # Uncalibrated defaults are rebuilt by the constructor; the JSON must agree with them.
        rebuilt = verdict.describe()
        if rebuilt["features"] != described["features"] or rebuilt["threshold"] != described["threshold"]:
            raise ExportedModelError(f"verdict settings {described} are marked uncalibrated but differ from the "
                                     f"rule's defaults {rebuilt}")
    return verdict
