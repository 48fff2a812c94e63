#!/usr/bin/env python
"""Export a trained DDL-Mask2Former for deployment (ONNX Runtime, or a torch.export program).

    python tools/export_model.py --config-file configs/ddl-i/ddl_mask2former_swin_tiny.yaml \
        --format onnx --output deploy/model.onnx MODEL.WEIGHTS output/model_final.pth

Writes the network (normalized image batch -> ``fake_logit`` and the ``mask_prob`` map at the
input size) to ``--output`` and, beside it, ``<output>.json`` with what the file expects and
what runs around it: pixel mean/std and channel order, the test resize, tile size and overlap,
flip, and the verdict (rule, coefficients, threshold, target false-positive rate, mask policy).
``ddl-mask2former predict|scan|serve --model FILE`` (``pip install .[serve]``: no torch),
``ForgeryPredictor.from_exported(FILE)`` and ``tools/demo.py --exported FILE`` run it.

``--format onnx`` takes any batch, height and width (opset 17; the deformable attention goes
through its PyTorch path, GridSample, no custom op; checked with onnx.checker).
``--format torch-export`` takes one height and width (``--size``; default the tile size with
TEST.TILE.ENABLED, else the test scale's shorter side), any batch.
The export runs on the CPU. Prints the files written, the export time and the file size.
"""
import argparse
import importlib.util
import logging
import os
import sys

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")
import ddl_mask2former  # noqa: F401  (registers the model)

import torch
from detectron2.modeling import build_model

from ddl_mask2former.config import load_config
from ddl_mask2former.deploy import FORMATS, export_model, metadata_path
from ddl_mask2former.engine import CheckpointMismatchError, TrainedModelCheckpointer

logger = logging.getLogger("ddl_mask2former.export_model")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--output", required=True, metavar="FILE",
                        help="exported file (.onnx / .pt2); its settings go to FILE.json")
    parser.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="example input size (torch-export: the only size the program takes)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[export_model] %(message)s")
    if args.format not in FORMATS:
        sys.exit(f"export_model: unknown --format {args.format!r}: choose one of {', '.join(FORMATS)}")
    try:
        cfg = load_config(args.config_file, args.opts, freeze=False)
    except FileNotFoundError as exc:
        sys.exit(f"export_model: {exc}")
    cfg.MODEL.DEVICE = "cpu"
    weights = cfg.MODEL.WEIGHTS
    if weights and not os.path.isfile(weights):
        sys.exit(f"export_model: MODEL.WEIGHTS file not found: {weights}")
    cfg.freeze()
    model = build_model(cfg).eval()
    if weights:
        try:
            TrainedModelCheckpointer(model, backbone_name=cfg.MODEL.BACKBONE.NAME).load(weights)
        except CheckpointMismatchError as exc:
            sys.exit(f"export_model: {exc}")
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting the model with random weights")
    with torch.no_grad():
        result = export_model(model, cfg, args.format, args.output, args.size)
    verdict = result["verdict"]
    print(f"[export_model] wrote {args.output} ({result['file_bytes'] / 2**20:.1f} MiB, {args.format}, "
          f"exported in {result['export_seconds']:.1f} s) and {metadata_path(args.output)}")
    if verdict is not None:
        print(f"[export_model] verdict: rule {verdict['rule']}, threshold {verdict['threshold']:.4g}, "
              f"target FPR {verdict['target_fpr']}, calibrated {verdict['calibrated']}, "
              f"mask policy {verdict['mask_policy']}")
    if args.format == "onnx":
        print(f"[export_model] serve it (pip install .[serve], no torch): ddl-mask2former serve --model {args.output}  "
              f"| ddl-mask2former scan FOLDER --model {args.output} --report OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
