#!/usr/bin/env python
"""CPU inference latency and peak memory: our DDLMask2Former (Swin-T) vs Hugging Face's Mask2Former.

Both models have random weights and the same shape: Swin-T backbone (96, [2,2,6,2], [3,6,12,24],
window 7), 6-layer deformable pixel decoder (256 dims, 8 heads, 4 points), 100 queries, 9
masked-attention decoder layers (HF counts 10: its ``decoder_layers`` includes the initial
prediction). Input: one 512x512 image. Ours runs the whole joint model (detection head too) and
returns full-resolution ``fake_prob``/``mask_prob``/``mask``; HF returns class and mask logits at
stride 4. Latencies are interleaved (ours, theirs, ours, ...) in one process so machine load
hits both alike. Wall time and the process's CPU time are both recorded: on a shared, busy
machine wall time includes waiting for a core, CPU time does not (with --threads 1 and an idle
machine the two agree). The ratios of medians are the result. Peak memory is the peak-RSS increase of one
inference, each model measured in its own fresh subprocess.

Usage: python benchmarks/bench_inference.py [--size 512] [--runs 10] [--warmup 2] [--threads N]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import require_package

require_package()

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS_CONFIG = os.path.join(REPO, "configs", "ddl-i", "ddl_mask2former_swin_tiny.yaml")


def build_ours(size):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from ddl_mask2former.config import add_ddl_mask2former_config
    import ddl_mask2former.modeling  # noqa: F401  (registers the model)

    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file(OURS_CONFIG)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    inputs = [{"image": image, "height": size, "width": size}]
    return model, lambda: model(inputs)


def build_hf(size):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone, num_queries=100, decoder_layers=10, num_labels=1,
        feature_size=256, mask_feature_size=256, hidden_dim=256, encoder_layers=6, num_attention_heads=8,
        dim_feedforward=2048, encoder_feedforward_dim=1024,
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    pixel_values = torch.randn(1, 3, size, size)
    return model, lambda: model(pixel_values=pixel_values)


BUILDERS = {"ours": build_ours, "hf": build_hf}


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(name, size):
    """Run in a fresh process: peak-RSS increase (MiB) of one inference after one warm-up."""
    torch.manual_seed(0)
    model, run = BUILDERS[name](size)
    with torch.no_grad():
        run()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM (peak RSS) to the current RSS
        run()
        peak = _status_kib("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"peak_mib": (peak - before) / 1024, "params_m": params / 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--memory-only", choices=sorted(BUILDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(measure_memory(args.memory_only, args.size)))
        return

    torch.manual_seed(0)
    runners = {name: builder(args.size)[1] for name, builder in BUILDERS.items()}
    times = {name: [] for name in runners}
    cpu_times = {name: [] for name in runners}
    with torch.no_grad():
        for _ in range(args.warmup):
            for run in runners.values():
                run()
        for _ in range(args.runs):
            for name, run in runners.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                run()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)

    memory = {}
    for name in runners:
        command = [sys.executable, os.path.abspath(__file__), "--memory-only", name, "--size", str(args.size)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"memory measurement of {name} failed:\n{result.stderr[-2000:]}")
        memory[name] = json.loads(result.stdout.strip().splitlines()[-1])

    print(f"CPU inference, {args.size}x{args.size}, batch 1, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.runs} interleaved runs after {args.warmup} warm-up")
    print(f"{'model':<6} {'wall median s':>14} {'wall min s':>11} {'cpu median s':>13} {'peak MiB':>9} {'params M':>9}")
    for name in runners:
        t = times[name]
        print(f"{name:<6} {statistics.median(t):>14.3f} {min(t):>11.3f} {statistics.median(cpu_times[name]):>13.3f} "
              f"{memory[name]['peak_mib']:>9.0f} {memory[name]['params_m']:>9.1f}")
    wall_ratio = statistics.median(times["ours"]) / statistics.median(times["hf"])
    cpu_ratio = statistics.median(cpu_times["ours"]) / statistics.median(cpu_times["hf"])
    print(f"latency ratio ours/hf, wall-time medians: {wall_ratio:.3f}  (target <= 0.8)")
    print(f"latency ratio ours/hf, CPU-time medians:  {cpu_ratio:.3f}  (target <= 0.8)")
    print(f"peak-memory ratio ours/hf: {memory['ours']['peak_mib'] / memory['hf']['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
