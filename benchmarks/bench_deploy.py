#!/usr/bin/env python
"""Exported model (issue 25): export time and file size, then CPU latency side by side.

The paper's Swin-T model (configs/ddl-i/ddl_mask2former_swin_tiny.yaml) with random weights is
exported to ONNX (any size) and to a torch.export program (512x512), then run, interleaved in one
process (so machine load hits all alike), on:

* one 512x512 image: ``ForgeryPredictor`` (PyTorch), ``ForgeryPredictor.from_exported`` on the
  ONNX file (ONNX Runtime) and on the .pt2 program, and Hugging Face's Mask2Former of the same
  shape (benchmarks/bench_inference.py's ``build_hf``: forward only, logits at stride 4);
* one 1000x1000 image (1 MP) with ``TEST.TILE`` 512 px tiles overlapping by 64 (3 x 3 = 9 tiles):
  PyTorch vs ONNX Runtime (the same ONNX file with a tiled settings JSON), and Hugging Face's
  forward on a whole 1024x1024 image, scaled to 1 MP, for reference (no tiling there).

Every predictor gets the same thread count (torch and ONNX Runtime intra-op threads). Wall
and process CPU time are both recorded; the ratios of medians are the result (goal: ONNX Runtime
at most 0.8x the PyTorch predictor's time). Exported files go to --out-dir.

Usage: python benchmarks/bench_deploy.py [--runs 3] [--warmup 1] [--threads 1] [--out-dir DIR]
       [--skip-hf] [--skip-torch-export]
Takes about 5-10 minutes on a 2-core machine.
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")
from ddl_mask2former import ForgeryPredictor  # noqa: E402  (first: hides detectron2's import warning)

import numpy as np
import torch

from ddl_mask2former.config import load_config
from ddl_mask2former.deploy import export_model, metadata_path
from ddl_mask2former.deploy.export import build_metadata

from _common import PAPER_CONFIG, TILE_OPTS_1MP, interleaved_timing, latency_report, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = str(PAPER_CONFIG)
TILE_OPTS = TILE_OPTS_1MP


def _hf_builder():
    spec = importlib.util.spec_from_file_location("bench_inference", os.path.join(REPO, "benchmarks",
                                                                                   "bench_inference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_hf


def _hf_runner(build_hf, height, width):
    model, _ = build_hf(512)
    pixel_values = torch.randn(1, 3, height, width)
    return lambda: model(pixel_values=pixel_values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    parser.add_argument("--out-dir", default=None, help="where the exported files go (default: a temporary folder)")
    parser.add_argument("--skip-hf", action="store_true", help="leave Hugging Face's Mask2Former out")
    parser.add_argument("--skip-torch-export", action="store_true", help="leave the .pt2 program out")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_deploy_")
    os.makedirs(out_dir, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; exported files in {out_dir}")

    cfg = load_config(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    pytorch = ForgeryPredictor(cfg)
    results = {"threads": args.threads, "torch": torch.__version__, "exports": {}}

    onnx_file = os.path.join(out_dir, "swin_tiny.onnx")
    exported = export_model(pytorch.model, cfg, "onnx", onnx_file)
    results["exports"]["onnx"] = {"seconds": exported["export_seconds"], "mib": exported["file_bytes"] / 2**20}
    if not args.skip_torch_export:
        program_file = os.path.join(out_dir, "swin_tiny_512.pt2")
        exported = export_model(pytorch.model, cfg, "torch-export", program_file, size=(512, 512))
        results["exports"]["torch-export"] = {"seconds": exported["export_seconds"],
                                              "mib": exported["file_bytes"] / 2**20}
    for fmt, row in results["exports"].items():
        print(f"export {fmt}: {row['seconds']:.1f} s, {row['mib']:.1f} MiB")

    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    onnx_predictor = ForgeryPredictor.from_exported(onnx_file, num_threads=args.threads)
    runners = {"pytorch predictor": lambda: pytorch(image),
               "onnxruntime predictor": lambda: onnx_predictor(image)}
    if not args.skip_torch_export:
        program_predictor = ForgeryPredictor.from_exported(program_file)
        runners["torch.export predictor"] = lambda: program_predictor(image)
    build_hf = None
    if not args.skip_hf:
        build_hf = _hf_builder()
        runners["hf mask2former forward"] = _hf_runner(build_hf, 512, 512)
    wall, cpu = interleaved_timing(runners, args.runs, args.warmup)
    results["512"] = latency_report(f"one 512x512 image, {args.runs} interleaved runs after {args.warmup} warm-up",
                             wall, cpu, "pytorch predictor")

    # 1 MP tiled: the same ONNX graph, with the tiled model's settings beside a link to it.
    tiled_cfg = load_config(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *TILE_OPTS])
    tiled = ForgeryPredictor(tiled_cfg)
    tiled.model.load_state_dict(pytorch.model.state_dict())
    tiled_onnx = os.path.join(out_dir, "swin_tiny_tiled.onnx")
    if os.path.exists(tiled_onnx):
        os.remove(tiled_onnx)
    os.link(onnx_file, tiled_onnx)
    with open(metadata_path(tiled_onnx), "w") as handle:
        json.dump(build_metadata(tiled.model, tiled_cfg, "onnx", tiled_onnx, None), handle, indent=2)
    tiled_onnx_predictor = ForgeryPredictor.from_exported(tiled_onnx, num_threads=args.threads)
    megapixel = np.random.default_rng(1).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    runners = {"pytorch tiled": lambda: tiled(megapixel),
               "onnxruntime tiled": lambda: tiled_onnx_predictor(megapixel)}
    if build_hf is not None:
        # 1024x1024 (Swin's sizes divide it), scaled to 1 MP
        runners["hf forward, whole image"] = _hf_runner(build_hf, 1024, 1024)
    wall, cpu = interleaved_timing(runners, args.runs, args.warmup)
    results["1mp_tiled"] = latency_report(f"one 1000x1000 image (1 MP), 512 px tiles overlap 64, per MP, {args.runs} "
                                   f"interleaved runs after {args.warmup} warm-up", wall, cpu, "pytorch tiled",
                                   {"hf forward, whole image": 1e6 / 1024**2})
    print(f"ONNX Runtime / PyTorch predictor, CPU-time medians: 512 px {results['512']['onnxruntime predictor']['cpu_ratio']:.3f}, "
          f"1 MP tiled {results['1mp_tiled']['onnxruntime tiled']['cpu_ratio']:.3f} (goal <= 0.8)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
