"""Serving an exported DDL-Mask2Former with ONNX Runtime, numpy and Pillow only: no torch
and no detectron2 in the process (``pip install ddl-mask2former[serve]``).

* ``ExportedPredictor(file)``: images in, ``{"fake_prob", "is_fake", "mask_prob", "mask"}`` out,
  as ``ForgeryPredictor``; ``ExportedModel`` is the runtime under it, which applies the rules
  stored in the settings JSON beside the file (``runtime.py``, ``rules.py``).
* ``ddl-mask2former predict | scan | serve``: JSON lines, a folder scan with a report, a local
  web page (``cli.py``).

Importing this package imports only the standard library, numpy and Pillow; ONNX Runtime
is imported when a model is loaded.
"""
from .images import ImageLimits, ImageReadError, load_image
from .runtime import ExportedModel, ExportedModelError, ExportedPredictor, read_settings, settings_path

__version__ = "0.1.0"

__all__ = ["ExportedModel", "ExportedModelError", "ExportedPredictor", "ImageLimits", "ImageReadError",
           "load_image", "read_settings", "settings_path", "__version__"]
