"""Deployment: the network exported to ONNX or ``torch.export``, and a runtime for the file.

* ``export.export_model(model, cfg, format, output)`` writes the file and, beside it,
  ``<output>.json``: the preprocessing it expects (pixel mean/std, channel order), the test
  resize, tiling and flip settings and the verdict (rule, coefficients, threshold, target FPR,
  mask policy), so the file alone reproduces ``DDLMask2Former.predict``.
* ``runtime.ExportedModel(file)`` runs it (ONNX Runtime or the exported program) with the
  same tiling, flip and verdict code as the PyTorch model; ``ForgeryPredictor.from_exported``
  wraps it in the predictor's call.

``tools/export_model.py`` is the command line.
"""
from .export import FORMATS, export_model, metadata_path
from .runtime import ExportedModel

__all__ = ["FORMATS", "ExportedModel", "export_model", "metadata_path"]
