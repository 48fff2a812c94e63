#!/usr/bin/env python
"""GPU check of the whole model with the compiled deformable-attention op vs the PyTorch path.

    python benchmarks/bench_gpu_model.py [--config configs/ddl-i/ddl_mask2former_swin_tiny.yaml]

Paper-size model, random weights, 512x512 crops: eval outputs of the two paths must agree, and
bf16-autocast training steps (batch 4) are timed side by side with their peak memory. Needs a
CUDA device and the built extension (``pip install -e .`` or ``setup.py build_ext --inplace``).
"""
import argparse
import os
import time
from pathlib import Path

from _common import require_package

require_package()
import ddl_mask2former  # first: it hides detectron2's import-time torch.jit deprecation warning

import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from ddl_mask2former import ops
from ddl_mask2former.config import add_ddl_mask2former_config

ROOT = Path(__file__).resolve().parents[1]


def batch(size, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    records = []
    for index in range(count):
        mask = torch.zeros(size, size, dtype=torch.uint8)
        if index % 2:
            mask[size // 4: size // 2, size // 3: 2 * size // 3] = 1
        records.append({"image": torch.randint(0, 255, (3, size, size), dtype=torch.uint8, generator=generator),
                        "label": index % 2, "forgery_mask": mask, "height": size, "width": size})
    return records


def time_training(model, records, steps, force_pytorch):
    os.environ["DDL_MSDA_FORCE_PYTORCH"] = "1" if force_pytorch else "0"
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = model(records)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if not torch.isfinite(total):
            raise SystemExit(f"non-finite loss {total.item()}")
    return sorted(times[1:])[len(times[1:]) // 2], torch.cuda.max_memory_allocated() / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/ddl-i/ddl_mask2former_swin_tiny.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not ops.compiled_op_available():
        raise SystemExit("needs a CUDA device and the compiled op (ddl_mask2former.ops._C)")
    ddl_mask2former.register_all()
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file(args.config)
    cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "", "cuda"
    torch.manual_seed(0)
    model = build_model(cfg)
    print(f"device: {torch.cuda.get_device_name(0)} | torch {torch.__version__} | config {args.config}")

    model.eval()
    inputs = [{"image": r["image"], "height": 512, "width": 512} for r in batch(512, 2, seed=1)]
    outputs = {}
    for force in (False, True):
        os.environ["DDL_MSDA_FORCE_PYTORCH"] = "1" if force else "0"
        with torch.no_grad():
            outputs[force] = model(inputs)
    for compiled, reference in zip(outputs[False], outputs[True]):
        print("eval, compiled vs PyTorch path: max |fake_prob| diff "
              f"{(compiled['fake_prob'] - reference['fake_prob']).abs().item():.2e}, max |mask_prob| diff "
              f"{(compiled['mask_prob'] - reference['mask_prob']).abs().max().item():.2e}")

    records = batch(512, 4)
    rows = {}
    for name, force in (("pytorch", True), ("compiled", False), ("pytorch", True), ("compiled", False)):
        rows[name] = time_training(model, records, args.steps, force)
    print("\n| deformable attention | train step ms (bf16 autocast, batch 4, 512x512) | peak MiB |")
    print("| --- | ---: | ---: |")
    for name, (seconds, peak) in rows.items():
        print(f"| {name} | {1000 * seconds:.1f} | {peak:.0f} |")
    print(f"compiled vs PyTorch path: {rows['pytorch'][0] / rows['compiled'][0]:.2f}x faster per step, "
          f"{rows['compiled'][1] / rows['pytorch'][1]:.2f}x the peak memory")


if __name__ == "__main__":
    main()
