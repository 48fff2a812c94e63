#!/usr/bin/env python
"""Training and inference throughput: DDL-Mask2Former vs Hugging Face Mask2Former (issue 10).

    python benchmarks/bench_gpu_throughput.py [--json out.json]      # GPU, paper-size models
    python benchmarks/bench_gpu_throughput.py --device cpu --small   # smoke test (seconds)

Both models have random weights and the same shape: Swin-T backbone (96, [2,2,6,2], [3,6,12,24],
window 7), 6-layer deformable pixel decoder (256 dims, 8 heads, 4 points), 100 queries, 9
masked-attention decoder layers (HF ``decoder_layers=10`` counts the initial prediction), 12544
points per mask, deep supervision. Measured, one model at a time:

* training step at ``--batch`` (16): forward + backward + AdamW under autocast (``--amp``,
  bfloat16 by default); our model gets what detectron2's loader yields (uint8 CPU images, CPU
  forgery masks, half of them real with no target) and moves them itself; HF gets float
  pixel values and mask/class labels already on the device. Median ms over ``--steps`` after
  ``--warmup``; peak = ``torch.cuda.max_memory_allocated`` (weights, gradients, AdamW state and
  activations).
* inference at batch 1 and ``--batch``: ours returns full-resolution ``fake_prob``/``mask_prob``;
  HF returns logits at stride 4. Our batched ``mask_prob`` is compared with each image run alone.
  On CUDA ours runs again with ``TEST.CUDA_GRAPH`` (forwards replayed from CUDA graphs), its
  ``mask_prob`` compared with the eager one.
* the quickstart model (``configs/quickstart/ddl_mask2former_quickstart_swin.yaml``, 128-px crops)
  training at ``--quickstart-batch`` (32): iterations/s, fp32 as configured and bf16; and its
  AdamW step alone in the default, foreach and fused implementations.
* aten operator calls per training step of our model and of the quickstart model, by phase
  (forward of each submodule, inputs and targets, backward, optimizer step): in eager mode the
  host pays for each call and a GPU usually launches one kernel for it. The quickstart model's
  step on one 32-px image gives the fixed cost that every step pays for those calls.
* host synchronizations per training step of our model: on CUDA counted by
  ``torch.cuda.set_sync_debug_mode``; everywhere the Python-level calls that force one when the
  tensor is on a GPU (``.item``, ``.cpu``, ``.tolist``, ``.numpy``, ``nonzero``, ``bool()``,
  ``linear_sum_assignment`` of the matcher), listed by call site.

HF's model comes from ``transformers`` (``--skip-hf`` or a missing install skips it: the table
then shows ours alone). Needs detectron2 for our model. ``--json`` writes every number.
"""
import argparse
import collections
import contextlib
import gc
import statistics
import sys
import time
import traceback
import warnings

from _common import (PAPER_CONFIG, QUICKSTART_CONFIG, SHAPES, add_json_argument, autocast, build_hf, build_ours,
                     ddl_records, hf_batch, require_package, saved_tensor_mib, write_json)

require_package()

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# ----------------------------------------------------------------------------- device helpers

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device):
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(function, device, steps, warmup):
    """Median and minimum seconds of ``function()`` over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


# ----------------------------------------------------------------------------- inputs

def adamw(model, device):
    """AdamW as both libraries' trainers run it on a GPU: fused there (train_net.py's
    build_optimizer; transformers' Trainer defaults to adamw_torch_fused), the default elsewhere."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")


def parameters_m(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


# ----------------------------------------------------------------------------- host syncs

_SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__")


@contextlib.contextmanager
def count_host_syncs(counts, package_roots):
    """Count Python-level calls that force a device->host sync when the tensor is on a GPU.

    ``counts[(call, site)] += 1`` where site is the innermost caller frame under one of
    ``package_roots`` (our package, detectron2's engine) or "other". On a CPU run nothing
    actually waits, but the same calls are the GPU run's syncs.
    """
    originals = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}
    original_nonzero = torch.nonzero

    def site():
        first = frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename
            for root in package_roots:
                if root in filename:
                    return f"{filename.split(root, 1)[1].lstrip('/')}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
        # Outside our code (e.g. torch.optim reading its CPU step counters: no sync on a GPU).
        return f"{first.f_code.co_filename.split('site-packages/')[-1]}:{first.f_lineno} ({first.f_code.co_name})"

    def wrap(name, original):
        def counted(*args, **kwargs):
            counts[(name, site())] += 1
            return original(*args, **kwargs)
        return counted

    matcher_module = None
    try:
        from ddl_mask2former.modeling import matcher as matcher_module
    except ImportError:
        pass
    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    torch.nonzero = wrap("nonzero", original_nonzero)
    original_lsa = getattr(matcher_module, "linear_sum_assignment", None)
    if original_lsa is not None:
        matcher_module.linear_sum_assignment = wrap("linear_sum_assignment", original_lsa)
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.nonzero = original_nonzero
        if original_lsa is not None:
            matcher_module.linear_sum_assignment = original_lsa


def cuda_sync_count(function):
    """Synchronizing CUDA calls made by ``function()``, from ``torch.cuda.set_sync_debug_mode``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = collections.Counter()
    for warning in caught:
        text = str(warning.message)
        if "synchronizing" in text.lower():
            messages[f"{warning.filename.split('site-packages/')[-1].split('DDLMask2Former/')[-1]}:{warning.lineno}"] += 1
    return sum(messages.values()), messages


def profile_step(step, device, top=15):
    """Operator calls (and CUDA kernel launches) of one step, and where the host time goes. On
    CUDA also the GPU's busy time (sum of kernel times) against the step's wall time: a step whose
    GPU is busy for a small part of its wall time is bound by the host launching kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1000
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    summary = {"aten_calls": sum(e.count for e in aten), "kernel_launches": launches, "wall_ms": round(wall_ms, 2),
               "top_self_cpu": [(e.key, e.count, round(e.self_cpu_time_total / 1000, 2))
                                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]}
    print(f"  profile: {summary['aten_calls']} aten operator calls, {launches} kernel launches per step; "
          f"wall {wall_ms:.1f} ms under the profiler; top self-CPU (op, calls, ms):")
    for key, count, ms in summary["top_self_cpu"]:
        print(f"    {ms:9.2f} ms {count:6d}x  {key}")
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    if kernels:
        busy_ms = sum(e.self_device_time_total for e in kernels) / 1000
        summary["gpu_busy_ms"] = round(busy_ms, 2)
        summary["gpu_kernels"] = sum(e.count for e in kernels)
        summary["top_kernels"] = [(e.key[:90], e.count, round(e.self_device_time_total / 1000, 2))
                                  for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]]
        print(f"  profile: GPU busy {busy_ms:.1f} ms of the step's {wall_ms:.1f} ms wall "
              f"({100 * busy_ms / wall_ms:.0f} %), {summary['gpu_kernels']} kernels; top kernels (name, calls, ms):")
        for key, count, ms in summary["top_kernels"]:
            print(f"    {ms:9.2f} ms {count:6d}x  {key}")
    return summary


class _OperatorCounter(TorchDispatchMode):
    """Counts every aten operator call, charged to the innermost phase on ``self.phases``."""

    def __init__(self):
        super().__init__()
        self.phases = ["inputs and targets"]
        self.calls = collections.Counter()
        self.by_op = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        phase = self.phases[-1]
        self.calls[phase] += 1
        self.by_op[phase][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def operator_census(model, optimizer, records, device, amp_dtype, top=4, verbose=True):
    """aten operator calls of one training step by phase: the forward of each direct submodule
    of the model (the rest of the forward, input batching and targets, is "inputs and targets"),
    the backward and the optimizer step. In eager mode each call is one dispatch on the host and
    usually one kernel launch on a GPU: the per-step fixed cost of a small model."""
    counter = _OperatorCounter()
    def leave(module, inputs, output):
        counter.phases.pop()  # returns None: the submodule's output stays as it is

    handles = []
    for name, child in model.named_children():
        handles.append(child.register_forward_pre_hook(lambda module, inputs, name=name: counter.phases.append(name)))
        handles.append(child.register_forward_hook(leave))
    model.train()
    try:
        with counter:
            with autocast(device, amp_dtype):
                losses = model(records)
                total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            counter.phases.append("backward")
            total.backward()
            counter.phases[-1] = "optimizer step"
            optimizer.step()
            counter.phases.pop()
            synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    census = {phase: {"calls": n, "top": counter.by_op[phase].most_common(top)}
              for phase, n in counter.calls.most_common()}
    if not verbose:
        return census
    print(f"  operator calls per training step: {sum(counter.calls.values())}")
    for phase, row in census.items():
        ops_text = ", ".join(f"{op} {n}" for op, n in row["top"])
        print(f"    {row['calls']:6d}  {phase:22s} ({ops_text})")
    return census


# ----------------------------------------------------------------------------- measurements

def ours_train_step(model, optimizer, records, device, amp_dtype):
    def step():
        torch.compiler.cudagraph_mark_step_begin()  # as DDLTrainLoop under reduce-overhead: a new step
        with autocast(device, amp_dtype):
            losses = model(records)
            total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return losses
    return step


def hf_train_step(model, optimizer, batch, device, amp_dtype):
    pixel_values, mask_labels, class_labels = batch

    def step():
        with autocast(device, amp_dtype):
            output = model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        return output.loss
    return step


def measure_training(name, model, step, device, args, batch):
    model.train()
    reset_peak(device)
    median, minimum = timed(step, device, args.steps, args.warmup)
    row = {"model": name, "batch": batch, "ms": 1000 * median, "min_ms": 1000 * minimum,
           "img_per_s": batch / median, "peak_gib": peak_gib(device), "params_m": parameters_m(model)}
    print(f"  train {name}: {row['ms']:.1f} ms/step (min {row['min_ms']:.1f}), {row['img_per_s']:.1f} img/s, "
          f"peak {row['peak_gib'] if row['peak_gib'] is None else round(row['peak_gib'], 2)} GiB", flush=True)
    return row


def measure_inference(name, model, run, device, args, batch):
    model.eval()
    reset_peak(device)
    base = allocated_gib(device)
    with torch.no_grad():
        median, minimum = timed(run, device, args.steps, args.warmup)
    peak = peak_gib(device)
    row = {"model": name, "batch": batch, "ms": 1000 * median, "min_ms": 1000 * minimum,
           "img_per_s": batch / median, "peak_gib": peak, "peak_above_weights_gib": None if peak is None else peak - base}
    print(f"  infer {name} batch {batch}: {row['ms']:.1f} ms ({row['img_per_s']:.1f} img/s)", flush=True)
    return row


def run_ours(args, device, shape, amp_dtype, results):
    model, cfg = build_ours(PAPER_CONFIG, device, args.shape, args.opts)
    if args.channels_last or args.compile:
        from ddl_mask2former.engine.compilation import apply_memory_format, compile_submodules

        apply_memory_format(model, args.channels_last)
        compile_submodules(model, args.compile, args.compile_mode, training_only=False)
    size = shape["image"]
    optimizer = adamw(model, device)
    records = ddl_records(args.batch, size)
    step = ours_train_step(model, optimizer, records, device, amp_dtype)
    results["train"].append(measure_training("ours", model, step, device, args, args.batch))

    # Host syncs of one training step, by call site.
    counts = collections.Counter()
    with count_host_syncs(counts, ("ddl_mask2former/", "detectron2/")):
        step()
    synchronize(device)
    results["host_sync_calls"] = {f"{call} @ {where}": n for (call, where), n in counts.most_common()}
    results["host_sync_calls_total"] = sum(counts.values())
    print(f"  ours: {sum(counts.values())} sync-forcing Python calls per training step:")
    for (call, where), n in counts.most_common(12):
        print(f"    {n:5d}  {call:22s} {where}")
    results["operator_census"] = operator_census(model, optimizer, records, device, amp_dtype)
    if args.profile:
        try:  # a profiler problem must not cost the inference numbers below
            results["profile"] = profile_step(step, device)
        except Exception:
            traceback.print_exc()
    if args.saved_tensors:
        results["saved_tensor_mib"], results["saved_tensor_mib_by_module"] = saved_tensor_mib(
            model, records, device, amp_dtype)
        by_module = ", ".join(f"{name} {mib:.0f}" for name, mib in results["saved_tensor_mib_by_module"].items())
        print(f"  ours: {results['saved_tensor_mib']:.0f} MiB saved for backward per training step ({by_module})")
    if device.type == "cuda":
        total, sites = cuda_sync_count(step)
        results["cuda_syncs_per_step"] = total
        results["cuda_sync_sites"] = dict(sites.most_common(20))
        print(f"  ours: {total} synchronizing CUDA calls per training step (torch.cuda.set_sync_debug_mode)")

    del optimizer
    model.zero_grad(set_to_none=True)
    outputs = {}
    for batch in (1, args.batch):
        inputs = [{"image": r["image"], "height": r["height"], "width": r["width"]} for r in ddl_records(batch, size, 1)]

        def run(inputs=inputs, batch=batch):
            with autocast(device, amp_dtype):
                outputs[batch] = model(inputs)
        results["inference"].append(measure_inference("ours", model, run, device, args, batch))
    # Batched mask_prob vs the first image alone, and bf16 vs fp32 on one image.
    batched = outputs[args.batch][0]["mask_prob"].float()
    single = outputs[1][0]["mask_prob"].float()
    results["mask_prob_batched_vs_single_max_abs"] = (batched - single).abs().max().item()
    with torch.no_grad():
        full = model([{"image": r["image"], "height": r["height"], "width": r["width"]}
                      for r in ddl_records(1, size, 1)])[0]["mask_prob"]
    results["mask_prob_amp_vs_fp32_max_abs"] = (single - full.float()).abs().max().item()
    print(f"  ours mask_prob: batch {args.batch} vs alone max |diff| "
          f"{results['mask_prob_batched_vs_single_max_abs']:.2e}; autocast vs fp32 "
          f"{results['mask_prob_amp_vs_fp32_max_abs']:.2e}")
    if device.type == "cuda":
        try:  # a capture problem must not cost the HF numbers
            measure_cuda_graph_inference(model, outputs, device, args, size, amp_dtype, results)
        except Exception:
            traceback.print_exc()
            results["cuda_graph_error"] = traceback.format_exc(limit=3)
    del model, outputs
    reset_peak(device)


def measure_cuda_graph_inference(model, eager_outputs, device, args, size, amp_dtype, results):
    """Inference through TEST.CUDA_GRAPH (CudaGraphRunner) at batch 1 and --batch, and its
    mask_prob against the eager model's on the same inputs."""
    from ddl_mask2former.modeling.cuda_graph import CudaGraphRunner

    model.cuda_graph = CudaGraphRunner(model._network, model)
    outputs = {}
    try:
        for batch in (1, args.batch):
            inputs = [{"image": r["image"], "height": r["height"], "width": r["width"]}
                      for r in ddl_records(batch, size, 1)]

            def run(inputs=inputs, batch=batch):
                with autocast(device, amp_dtype):
                    outputs[batch] = model(inputs)
            results["inference"].append(measure_inference("ours-graph", model, run, device, args, batch))
        differences = [(graphed["mask_prob"].float() - eager["mask_prob"].float()).abs().max().item()
                       for graphed, eager in zip(outputs[args.batch], eager_outputs[args.batch])]
        results["cuda_graph_mask_prob_vs_eager_max_abs"] = max(differences)
        results["cuda_graph_captures"] = model.cuda_graph.captures
        print(f"  ours CUDA graph: {model.cuda_graph.captures} captures; mask_prob vs eager max |diff| "
              f"{max(differences):.2e} (goal <= 1e-3)")
    finally:
        model.cuda_graph = None


def run_hf(args, device, shape, amp_dtype, results):
    try:
        model = build_hf(shape, device)
    except ImportError as exc:
        results["hf_skipped"] = f"transformers not importable: {exc}"
        print(f"  HF skipped: {results['hf_skipped']}")
        return
    optimizer = adamw(model, device)
    batch = hf_batch(ddl_records(args.batch, shape["image"]), device)
    step = hf_train_step(model, optimizer, batch, device, amp_dtype)
    results["train"].append(measure_training("hf", model, step, device, args, args.batch))
    if args.profile:
        results["hf_profile"] = profile_step(step, device)
    del optimizer, batch
    model.zero_grad(set_to_none=True)
    for size in (1, args.batch):
        pixel_values = torch.randn(size, 3, shape["image"], shape["image"], device=device)

        def run(pixel_values=pixel_values):
            with autocast(device, amp_dtype):
                model(pixel_values=pixel_values)
        results["inference"].append(measure_inference("hf", model, run, device, args, size))
    del model
    reset_peak(device)


def run_quickstart(args, device, results):
    for label, amp_dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model, cfg = build_ours(QUICKSTART_CONFIG, device, "full", args.opts)
        if args.compile:
            from ddl_mask2former.engine.compilation import compile_submodules

            compile_submodules(model, args.compile, args.compile_mode, training_only=False)
        size = cfg.INPUT.CROP.SIZE[0]
        optimizer = adamw(model, device)
        records = ddl_records(args.quickstart_batch, size, seed=2)
        step = ours_train_step(model, optimizer, records, device, amp_dtype)
        model.train()
        median, minimum = timed(step, device, args.steps, args.warmup)
        row = {"precision": label, "batch": args.quickstart_batch, "crop": size, "s_per_it": median,
               "it_per_s": 1 / median, "min_s": minimum, "compiled": args.compile, "compile_mode": args.compile_mode}
        results["quickstart"].append(row)
        print(f"  quickstart model {label}{' compiled' if args.compile else ''}, batch {args.quickstart_batch} at {size} px: "
              f"{median * 1000:.1f} ms/it = {1 / median:.1f} it/s", flush=True)
        if label == "fp32":  # after the timed steps: AdamW's state already exists
            results["quickstart_operator_census"] = operator_census(model, optimizer, records, device, amp_dtype)
            results["quickstart_fixed_cost"] = fixed_step_cost(model, optimizer, device, args)
            results["quickstart_optimizer_ms"] = optimizer_step_ms(model, device, args)
            if args.profile:
                try:
                    results["quickstart_profile"] = profile_step(step, device)
                except Exception:
                    traceback.print_exc()
        del model, optimizer
        reset_peak(device)


def optimizer_step_ms(model, device, args):
    """AdamW's step alone on the model's parameters (random gradients), per implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    for param in params:
        param.grad = torch.randn_like(param)
    row = {}
    for label, options in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
        median, _ = timed(optimizer.step, device, max(args.steps, 5), args.warmup)
        row[label] = median * 1000
    with torch.no_grad():
        for param, value in zip(params, saved):
            param.copy_(value)
            param.grad = None
    print("  quickstart model, AdamW step alone: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()), flush=True)
    return row


def fixed_step_cost(model, optimizer, device, args, size=32):
    """The step's cost when there is almost nothing to compute (one 32-px image): what every
    step pays for dispatching its operators, whatever the batch."""
    records = ddl_records(1, size, seed=3)
    step = ours_train_step(model, optimizer, records, device, None)
    median, _ = timed(step, device, max(args.steps, 5), args.warmup)
    census = operator_census(model, optimizer, records, device, None, verbose=False)
    calls = sum(row["calls"] for row in census.values())
    row = {"s_per_it": median, "aten_calls": calls, "us_per_call": 1e6 * median / calls}
    print(f"  quickstart model, fixed cost (batch 1 at {size} px): {median * 1000:.1f} ms/step for {calls} "
          f"aten calls = {row['us_per_call']:.1f} us per call", flush=True)
    return row


def print_table(results, batch):
    rows = {(r["model"], "train"): r for r in results["train"]}
    rows.update({(r["model"], f"infer{r['batch']}"): r for r in results["inference"]})
    print(f"\n{results['header']}")
    print("| measurement | ours ms | HF ms | ratio ours/HF | ours img/s | HF img/s | ours peak GiB | HF peak GiB |"
          " peak ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, key, label in (("ours", "train", f"training step, batch {batch}"),
                             ("ours", "infer1", "inference, batch 1"),
                             ("ours", f"infer{batch}", f"inference, batch {batch}"),
                             ("ours-graph", "infer1", "inference, batch 1, ours with TEST.CUDA_GRAPH"),
                             ("ours-graph", f"infer{batch}", f"inference, batch {batch}, ours with TEST.CUDA_GRAPH")):
        ours, hf = rows.get((name, key)), rows.get(("hf", key))
        if ours is None:
            continue

        def fmt(row, field, digits=1):
            value = None if row is None else row.get(field)
            return "-" if value is None else f"{value:.{digits}f}"
        ratio = "-" if hf is None else f"{ours['ms'] / hf['ms']:.3f}"
        peak_ratio = ("-" if hf is None or ours.get("peak_gib") is None
                      else f"{ours['peak_gib'] / hf['peak_gib']:.3f}")
        print(f"| {label} | {fmt(ours, 'ms')} | {fmt(hf, 'ms')} | {ratio} | {fmt(ours, 'img_per_s')} | "
              f"{fmt(hf, 'img_per_s')} | {fmt(ours, 'peak_gib', 2)} | {fmt(hf, 'peak_gib', 2)} | {peak_ratio} |")
    for row in results["quickstart"]:
        compiled = f", compiled {'+'.join(row['compiled'])} ({row['compile_mode']})" if row.get("compiled") else ""
        print(f"| quickstart model training, {row['precision']}{compiled}, batch {row['batch']} ({row['crop']} px) | "
              f"{row['s_per_it'] * 1000:.1f} | | | {row['it_per_s'] * row['batch']:.1f} | | | | |"
              f"  ({row['it_per_s']:.1f} it/s)")
    fixed = results.get("quickstart_fixed_cost")
    if fixed:
        print(f"| quickstart model, fixed cost per step (batch 1, 32 px) | {fixed['s_per_it'] * 1000:.1f} | | | | | | | |"
              f"  ({fixed['aten_calls']} aten calls, {fixed['us_per_call']:.1f} us each)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny models and images (CPU smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="training and large inference batch (16; small: 2)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side for ours and HF (512; small: 64), e.g. 256 for a CPU memory census")
    parser.add_argument("--quickstart-batch", type=int, default=None, help="quickstart model batch (32; small: 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; small: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; small: 1)")
    parser.add_argument("--amp", choices=("bfloat16", "float16", "none"), default="bfloat16")
    parser.add_argument("--skip-ours", action="store_true", help="no paper-size model of ours (e.g. quickstart only)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--compile", nargs="+", default=[], metavar="MODULE",
                        help="torch.compile these submodules of our models, the quickstart's too "
                             "(as SOLVER.COMPILE.MODULES)")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode (as SOLVER.COMPILE.MODE); reduce-overhead replays CUDA graphs")
    parser.add_argument("--channels-last", action="store_true", help="our model's weights channels-last")
    parser.add_argument("--saved-tensors", action="store_true",
                        help="MiB that autograd saves for the backward of our training step")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of one training step")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides for our models, paper-size and quickstart (e.g. "
                             "MODEL.SWIN.FUSED_ATTENTION True)")
    add_json_argument(parser)
    args = parser.parse_args()
    args.shape = "small" if args.small else "full"
    defaults = {"batch": (16, 2), "quickstart_batch": (32, 4), "steps": (10, 2), "warmup": (3, 1)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.small else full)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_throughput.py: no CUDA device (use --device cpu --small for a smoke test)")
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}[args.amp]
    if amp_dtype == torch.float16 and device.type != "cuda":
        raise SystemExit("bench_gpu_throughput.py: --amp float16 needs CUDA")
    shape = dict(SHAPES[args.shape], **({"image": args.image_size} if args.image_size else {}))

    from ddl_mask2former import ops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    extras = "".join([f" | ours compiled ({args.compile_mode}): {','.join(args.compile)}" if args.compile else "",
                      " | ours channels-last" if args.channels_last else "",
                      f" | ours {' '.join(args.opts)}" if args.opts else ""])
    header = (f"device {name} | torch {torch.__version__} | autocast {args.amp}{extras} | {args.shape} models, "
              f"{shape['image']}x{shape['image']} | deformable attention: "
              f"{'compiled op' if device.type == 'cuda' and ops.compiled_op_available() else 'PyTorch path'}")
    print(header, flush=True)
    results = {"header": header, "args": vars(args), "train": [], "inference": [], "quickstart": []}
    failures = []
    parts = [] if args.skip_ours else [("ours", lambda: run_ours(args, device, shape, amp_dtype, results))]
    if not args.skip_hf:
        parts.append(("hf", lambda: run_hf(args, device, shape, amp_dtype, results)))
    if not args.skip_quickstart:
        parts.append(("quickstart", lambda: run_quickstart(args, device, results)))
    for part, function in parts:
        print(f"\n== {part}", flush=True)
        try:
            function()
        except Exception:  # one broken part must not hide the others' numbers
            failures.append(part)
            traceback.print_exc()
            reset_peak(device)
    print_table(results, args.batch)
    results["failed_parts"] = failures
    write_json(args.json, results)
    if failures:
        raise SystemExit(f"bench_gpu_throughput.py: parts failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
