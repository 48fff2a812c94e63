#!/usr/bin/env python
"""Memory of one training step of our model, per set of config overrides, each in a fresh process.

    python benchmarks/bench_train_memory.py --size 256 --batch 2 --amp bfloat16 \
        --variant off MODEL.SWIN.RECOMPUTE_ATTENTION False MODEL.SWIN.RECOMPUTE_GELU False \
        --variant defaults

For each variant: the peak RSS that one forward + backward adds above the built model (the
process's high-water mark, so the step runs first and once), then the MiB of distinct storages
autograd keeps for the backward, in all and by submodule (``saved_tensor_mib`` of
``bench_gpu_throughput.py``, a second step). A CPU measurement: on a GPU
``bench_gpu_throughput.py`` reports ``torch.cuda.max_memory_allocated``. On the CPU the
deformable attention runs its PyTorch path, which keeps its sampled values for the backward;
``--registered-msda`` routes it through the registered operator instead
(``MODEL.DDL.PIXEL_DECODER.REGISTERED_OP True``),
which keeps only its inputs, as the CUDA op does, so the pixel decoder's figure is a GPU's.
"""
import argparse
import json
import resource
import subprocess
import sys

import torch

import _common as bench

bench.require_package()


def measure(args, overrides):
    if args.registered_msda:
        overrides = [*overrides, "MODEL.DDL.PIXEL_DECODER.REGISTERED_OP", "True"]
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    amp_dtype = {"bfloat16": torch.bfloat16, "none": None}[args.amp]
    model, _ = bench.build_ours(bench.PAPER_CONFIG, device, "full", overrides)
    model.train()
    records = bench.ddl_records(args.batch, args.size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with bench.autocast(device, amp_dtype):
        losses = model(records)
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    saved, by_module = bench.saved_tensor_mib(model, records, device, amp_dtype, args.depth)
    return {"peak_rss_mib": peak, "step_adds_mib": peak - before, "saved_mib": saved, "saved_by_module": by_module}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", type=int, default=256, help="image side (px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", choices=("bfloat16", "none"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", nargs="+", action="append", metavar="NAME [KEY VALUE ...]",
                        help="a name and config overrides (default: one variant, the config as it is)")
    parser.add_argument("--registered-msda", action="store_true",
                        help="deformable attention through the registered operator (keeps only its "
                             "inputs for the backward, as on a GPU)")
    parser.add_argument("--depth", type=int, default=1,
                        help="attribute saved tensors to submodules down to this many name parts "
                             "(2: pixel_decoder.encoder; list indices are merged)")
    bench.add_json_argument(parser)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args, args.child)))
        return
    results = {}
    msda = "registered operator" if args.registered_msda else "PyTorch path"
    print(f"paper model, batch {args.batch} at {args.size} px, autocast {args.amp}, CPU, {args.threads} threads, "
          f"deformable attention: {msda}")
    for name, *overrides in args.variant or [["defaults"]]:
        command = [sys.executable, __file__, "--size", str(args.size), "--batch", str(args.batch), "--amp", args.amp,
                   "--threads", str(args.threads), "--depth", str(args.depth), *(["--registered-msda"] if args.registered_msda else []),
                   "--child", *overrides]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"bench_train_memory.py: variant {name} failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
        row = results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        by_module = ", ".join(f"{module} {mib:.1f}" for module, mib in row["saved_by_module"].items())
        print(f"  {name}: the step adds {row['step_adds_mib']:.0f} MiB of peak RSS "
              f"({row['peak_rss_mib']:.0f} in all); saved for backward {row['saved_mib']:.1f} MiB ({by_module})",
              flush=True)
    bench.write_json(args.json, results)


if __name__ == "__main__":
    main()
