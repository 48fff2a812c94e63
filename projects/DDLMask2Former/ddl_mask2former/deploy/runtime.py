"""The runtime of exported files: ``ddl_mask2former_serve.runtime`` (numpy, ONNX Runtime), which
applies the settings JSON's rules around the network. This module adds what needs torch: running
a ``torch.export`` program (``.pt2``) as that runtime's network.
"""
import os

import numpy as np
import torch

from ddl_mask2former_serve.runtime import ExportedModel, ExportedModelError, ExportedPredictor, read_settings

__all__ = ["ExportedModel", "ExportedModelError", "ExportedPredictor", "load_exported"]


def _program_network(path):
    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch.export.load raises several types for a bad file
        raise ExportedModelError(f"{path}: torch.export.load cannot read it ({exc})") from exc
    module = program.module()

    def run(normalized: np.ndarray):
        with torch.no_grad():
            outputs = module(torch.from_numpy(normalized))
        return [output.numpy() for output in outputs]

    return run


def load_exported(path, providers=None, num_threads=None) -> ExportedPredictor:
    """An ``ExportedPredictor`` for ``path``: an ONNX file through ONNX Runtime, or a
    ``torch.export`` program (``.pt2``) through torch, both with the rules of ``<path>.json``."""
    path = os.fspath(path)
    network = None
    if os.path.isfile(path) and read_settings(path)["format"] == "torch-export":
        network = _program_network(path)
    return ExportedPredictor(path, providers=providers, num_threads=num_threads, network=network)
