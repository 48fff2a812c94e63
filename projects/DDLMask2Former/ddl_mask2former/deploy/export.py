"""Export a ``DDLMask2Former`` to ONNX or ``torch.export`` (``tools/export_model.py``).

ONNX: traced by torch's TorchScript-based exporter (``dynamo=False``) with dynamic batch,
height and width, opset 17 (``GridSample`` carries the deformable attention's PyTorch path,
no custom op), then checked with ``onnx.checker``. The dynamo-based exporter and
``torch.export`` cannot keep the height and width symbolic for this model (the Swin trunk and
the pooling branch on the size), so:

``torch-export``: one program for one input size (``size``; by default the tile size when
``TEST.TILE.ENABLED``, since every tile of an image at least a tile wide has it), batch dynamic,
saved with ``torch.export.save``. The runtime refuses other sizes with an error that says so.
"""
import json
import logging
import os
import time
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch

from ddl_mask2former_serve.runtime import SETTINGS_VERSION, settings_path

from .. import __version__
from .network import ExportableNetwork

__all__ = ["FORMATS", "ONNX_OPSET", "INPUT_NAME", "export_model", "metadata_path", "build_metadata"]

logger = logging.getLogger(__name__)

# format -> usual file extension
FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
# GridSample entered the standard ONNX operator set in opset 16.
ONNX_OPSET = 17
INPUT_NAME = "normalized"
METADATA_VERSION = SETTINGS_VERSION
# The JSON written beside an exported file: ``<file>.json`` (the serving runtime reads it).
metadata_path = settings_path


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {sorted(FORMATS)}")


def default_size(cfg) -> Tuple[int, int]:
    """Example input size: the tile size with tiling, else the test scale's shorter side, square,
    rounded up to 32."""
    if cfg.TEST.TILE.ENABLED:
        return (int(cfg.TEST.TILE.SIZE), int(cfg.TEST.TILE.SIZE))
    side = int(min(cfg.INPUT.BASE_SCALE))
    side = -(-side // 32) * 32
    return (side, side)


def build_metadata(model, cfg, fmt: str, exported_file: str, size: Optional[Tuple[int, int]]) -> Dict:
    """What the runtime needs besides the network: every rule of ``DDLMask2Former.predict``
    (``ddl_mask2former_serve.runtime`` reads it; nothing there is a default)."""
    tiling = model.tiling
    verdict = model.verdict
    return {
        "metadata_version": METADATA_VERSION,
        "format": fmt,
        "file": os.path.basename(exported_file),
        "ddl_mask2former_version": __version__,
        "torch_version": torch.__version__,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "weights": cfg.MODEL.WEIGHTS or None,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW float32, (pixels - pixel_mean) / pixel_std, pixels 0-255",
            "channel_order": cfg.INPUT.FORMAT,
            "channels": len(cfg.MODEL.PIXEL_MEAN),
            "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
            "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
            # None: any height and width (the network pads to its size divisibility itself).
            "size": list(size) if size is not None else None,
        },
        "outputs": ExportableNetwork(model).output_names,
        "tasks": list(model.tasks),
        # The evaluation mapper's resize; None when tiling keeps native pixels.
        "test_resize": None if cfg.TEST.TILE.ENABLED else {
            "base_scale": [int(v) for v in cfg.INPUT.BASE_SCALE],
            "enlarge": bool(cfg.INPUT.BASE_SCALE_ENLARGE),
        },
        "tiling": None if tiling is None else {
            "tile_size": tiling.tile_size,
            "overlap": tiling.overlap,
            "batch_size": tiling.batch_size,
            "fake_prob_rule": tiling.fake_prob_rule,
            "base_scale": list(tiling.base_scale),
            "base_scale_enlarge": tiling.base_scale_enlarge,
        },
        "flip": bool(model.flip),
        "verdict": None if verdict is None else dict(verdict.describe(), enabled=verdict.enabled),
    }


def export_model(model, cfg, fmt: str, output, size: Optional[Sequence[int]] = None) -> Dict:
    """Export ``model`` (a ``DDLMask2Former`` built from ``cfg``, weights loaded; moved to the
    CPU and put in eval mode) to ``output`` in ``fmt`` and write ``metadata_path(output)``. Returns the metadata, plus
    ``export_seconds`` and ``file_bytes``.

    ``size``: (height, width) of the example input; for ``torch-export`` the only size the
    program takes (default ``default_size(cfg)``). ONNX takes any size.
    """
    _check_format(fmt)
    output = os.fspath(output)
    model = model.to("cpu").eval()  # the trace runs on the CPU (and the op's PyTorch path)
    height, width = tuple(int(s) for s in (size or default_size(cfg)))
    if height < 1 or width < 1:
        raise ValueError(f"export size must be positive, got {height}x{width}")
    network = ExportableNetwork(model).eval()
    example = torch.zeros(2, len(cfg.MODEL.PIXEL_MEAN), height, width)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    start = time.perf_counter()
    if fmt == "onnx":
        _export_onnx(network, example, output)
        fixed_size = None
    else:
        _export_program(network, example, output)
        fixed_size = (height, width)
    seconds = time.perf_counter() - start
    metadata = build_metadata(model, cfg, fmt, output, fixed_size)
    with open(metadata_path(output), "w") as handle:
        json.dump(metadata, handle, indent=2)
        handle.write("\n")
    return dict(metadata, export_seconds=seconds, file_bytes=os.path.getsize(output))


def _export_onnx(network, example, output):
    try:
        import onnx
    except ImportError:
        raise ImportError("exporting to ONNX needs the onnx package: pip install -e .[deploy] "
                          "(or pip install -r requirements/deploy.txt)") from None
    names = network.output_names
    dynamic_axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    if "fake_logit" in names:
        dynamic_axes["fake_logit"] = {0: "batch"}
    if "mask_prob" in names:
        dynamic_axes["mask_prob"] = {0: "batch", 1: "height", 2: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        # The trace warns at every Python use of a traced size; the graph keeps them symbolic
        # where it matters, which the parity tests check at several sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*dynamo=False.*")
        # The exporter's notes on its own constant folding and shape inference.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(network, (example,), output, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic_axes)
    onnx.checker.check_model(output, full_check=True)


def _export_program(network, example, output):
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, output)
