"""Deployment: the network exported to ONNX or ``torch.export``, and a runtime for the file.

* ``export.export_model(model, cfg, format, output)`` writes the file and, beside it,
  ``<output>.json``: the preprocessing it expects (pixel mean/std, channel order), the test
  resize, tiling and flip settings and the verdict (rule, coefficients, threshold, target FPR,
  mask policy), so the file alone reproduces ``DDLMask2Former.predict``.
* ``ddl_mask2former_serve.runtime.ExportedModel(file)`` runs an ONNX file with the JSON's
  rules (numpy and ONNX Runtime, no torch); ``runtime.load_exported(file)`` (what
  ``ForgeryPredictor.from_exported`` returns) also runs a ``.pt2`` program through it.

``tools/export_model.py`` is the command line.
"""
from .export import FORMATS, export_model, metadata_path
from .runtime import ExportedModel, ExportedPredictor, load_exported

__all__ = ["FORMATS", "ExportedModel", "ExportedPredictor", "export_model", "load_exported", "metadata_path"]
