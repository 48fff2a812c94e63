"""Multi-scale deformable attention: PyTorch path vs the compiled CUDA op, side by side.

Default shape = the training shape: batch 8 crops of 512x512 -> levels 64x64, 32x32, 16x16,
8 heads, 4 points, 32 channels per head, queries = every pixel of the three levels.

    python benchmarks/bench_msda.py                       # GPU: both paths, batch 8
    python benchmarks/bench_msda.py --device cpu --batch 1  # CPU: PyTorch path only

Reports the median forward and forward+backward time and the peak memory above the inputs
(GPU: torch.cuda.max_memory_allocated; CPU: process RSS high-water mark, measured in a fresh
child process per measurement). Ratios matter more than absolute times on a shared machine.
"""
import argparse
import multiprocessing
import statistics
import time

from _common import add_json_argument, require_package, write_json

require_package()

import torch

from ddl_mask2former.ops import compiled_op_available, ms_deform_attn_pytorch
from ddl_mask2former.ops.registered_op import ms_deform_attn_op

LEVELS = ((64, 64), (32, 32), (16, 16))
PATHS = {
    "pytorch": ms_deform_attn_pytorch,
    # Widest channel packs per thread (the default of ms_deform_attn) and one channel per thread.
    "compiled": lambda *inputs: ms_deform_attn_op(*inputs, 0),
    "compiled_1ch": lambda *inputs: ms_deform_attn_op(*inputs, 1),
}


def make_inputs(batch, n_heads, head_dim, n_points, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    total_len = int(areas.sum())
    n_levels = len(LEVELS)
    value = torch.randn(batch, total_len, n_heads, head_dim, generator=generator)
    # Reference point per query plus offsets of a few pixels, as after training starts.
    reference = torch.rand(batch, total_len, 1, 1, 1, 2, generator=generator)
    offsets = torch.randn(batch, total_len, n_heads, n_levels, n_points, 2, generator=generator) * 0.02
    sampling_locations = reference + offsets
    weights = torch.randn(batch, total_len, n_heads, n_levels * n_points, generator=generator).softmax(-1)
    weights = weights.view(batch, total_len, n_heads, n_levels, n_points)
    return [value.to(device, dtype), spatial_shapes.to(device), level_start_index.to(device),
            sampling_locations.to(device, dtype), weights.to(device, dtype)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_once(function, inputs, backward, grad_output):
    leaves = [t.detach().requires_grad_(backward) if t.is_floating_point() else t for t in inputs]
    output = function(*leaves)
    if backward:
        output.backward(grad_output)
    return output


def time_path(function, inputs, backward, warmup, repeats):
    device = inputs[0].device
    batch, total_len, n_heads, head_dim = inputs[0].shape
    grad_output = torch.ones(batch, inputs[3].shape[1], n_heads * head_dim, device=device, dtype=inputs[0].dtype)
    grad_context = torch.enable_grad() if backward else torch.no_grad()
    with grad_context:
        for _ in range(warmup):
            _run_once(function, inputs, backward, grad_output)
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _run_once(function, inputs, backward, grad_output)
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cuda_peak_memory(function, inputs, backward):
    device = inputs[0].device
    grad_output = torch.ones(inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                             device=device, dtype=inputs[0].dtype)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.enable_grad() if backward else torch.no_grad():
        output = _run_once(function, inputs, backward, grad_output)
    torch.cuda.synchronize(device)
    del output
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def _read_status_kib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _cpu_memory_worker(args, backward, queue):
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.batch, args.heads, args.head_dim, args.points, getattr(torch, args.dtype), "cpu")
    grad_output = torch.ones(args.batch, inputs[3].shape[1], args.heads * args.head_dim)
    before = _read_status_kib("VmRSS")
    with torch.enable_grad() if backward else torch.no_grad():
        _run_once(ms_deform_attn_pytorch, inputs, backward, grad_output)
    queue.put((_read_status_kib("VmHWM") - before) / 1024)


def cpu_peak_memory(args, backward):
    """RSS high-water mark above the inputs, measured in a fresh process so nothing else counts."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_cpu_memory_worker, args=(args, backward, queue))
    worker.start()
    worker.join()
    if worker.exitcode != 0:
        raise RuntimeError(f"CPU memory worker failed with exit code {worker.exitcode}")
    return queue.get()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="crops per batch (training shape: 8)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    add_json_argument(parser)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    paths = ["pytorch"]
    if device.type == "cuda":
        if compiled_op_available():
            paths += ["compiled", "compiled_1ch"]
        else:
            print("NOTE: ddl_mask2former.ops._C is not built; only the PyTorch path is measured")
    total_len = sum(h * w for h, w in LEVELS)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({args.threads} threads)'}"
          f" | torch {torch.__version__} | dtype {args.dtype}")
    print(f"shape: batch {args.batch}, levels {LEVELS}, heads {args.heads}, points {args.points}, "
          f"head_dim {args.head_dim}, queries {total_len}")
    if args.batch != 8:
        print(f"NOTE: batch {args.batch} instead of the training shape's 8")

    inputs = make_inputs(args.batch, args.heads, args.head_dim, args.points, dtype, device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "batch": args.batch, "dtype": args.dtype, "paths": {}}
    if "compiled" in paths:
        with torch.no_grad():
            difference = (PATHS["compiled"](*inputs).float() - PATHS["pytorch"](*inputs).float()).abs().max().item()
        results["max_abs_difference"] = difference
        print(f"compiled vs pytorch output: max |difference| = {difference:.3e}")
    for path in paths:
        function = PATHS[path]
        forward_ms = time_path(function, inputs, False, args.warmup, args.repeats)
        train_ms = time_path(function, inputs, True, args.warmup, args.repeats)
        if device.type == "cuda":
            forward_mib = cuda_peak_memory(function, inputs, False)
            train_mib = cuda_peak_memory(function, inputs, True)
        else:
            forward_mib = cpu_peak_memory(args, False)
            train_mib = cpu_peak_memory(args, True)
        results["paths"][path] = {"forward_ms": forward_ms, "forward_backward_ms": train_ms,
                                  "forward_peak_mib": forward_mib, "forward_backward_peak_mib": train_mib}

    print()
    print("| path | forward ms | fwd+bwd ms | forward peak MiB | fwd+bwd peak MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path, numbers in results["paths"].items():
        print(f"| {path} | {numbers['forward_ms']:.2f} | {numbers['forward_backward_ms']:.2f} | "
              f"{numbers['forward_peak_mib']:.1f} | {numbers['forward_backward_peak_mib']:.1f} |")
    slow = results["paths"]["pytorch"]
    for variant in [p for p in results["paths"] if p != "pytorch"]:
        fast = results["paths"][variant]
        ratios = {
            "forward_speedup": slow["forward_ms"] / fast["forward_ms"],
            "forward_backward_speedup": slow["forward_backward_ms"] / fast["forward_backward_ms"],
            "forward_backward_memory_ratio": fast["forward_backward_peak_mib"] / slow["forward_backward_peak_mib"],
        }
        fast.update(ratios)
        print(f"{variant} vs pytorch: forward {ratios['forward_speedup']:.1f}x faster, fwd+bwd "
              f"{ratios['forward_backward_speedup']:.1f}x faster, fwd+bwd peak memory "
              f"{ratios['forward_backward_memory_ratio']:.2f}x of the PyTorch path's")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
