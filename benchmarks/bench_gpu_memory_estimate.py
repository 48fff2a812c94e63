#!/usr/bin/env python
"""Peak GPU memory of a training step, estimated on a machine without a GPU (issue 10's goal:
our peak <= 0.6x Hugging Face Mask2Former's).

    python benchmarks/bench_gpu_memory_estimate.py        # ours (config as it is) vs HF, batch 16, 512 px, bf16
    python benchmarks/bench_gpu_memory_estimate.py --variant defaults \\
        --variant half_projections MODEL.DDL.PIXEL_DECODER.FP32_PROJECTIONS False
    python benchmarks/bench_gpu_memory_estimate.py --small  # tiny shapes, a smoke test (seconds)

How: both models are built on the CPU, then their parameters and buffers become fake CUDA
tensors (``FakeTensorMode``: shapes, dtypes and devices, no data, nothing computed). One training
forward runs as ``bench_gpu_throughput.py`` runs it on a GPU (the same inputs; HF gets its
labels on the device), under CUDA's autocast policy, which is switched on by hand
(``torch.autocast("cuda")`` turns itself off without a GPU; CUDA's policy differs from the
CPU's, e.g. LayerNorm, GroupNorm, softmax and resizing run in float32 there). A dispatch mode
follows every CUDA storage from creation to release, rounded up to 512 bytes as the caching
allocator rounds, and records the peak.

What is made to behave as on a GPU:
* ``F.scaled_dot_product_attention`` runs the memory-efficient kernel (a boolean mask becomes an
  additive bias first), as CUDA picks it for masked attention; a build without a GPU would take
  the math path, which keeps the whole attention matrix.
* Our deformable attention goes through the registered operator
  (``MODEL.DDL.PIXEL_DECODER.REGISTERED_OP True``, whatever the variant), whose fake
  implementation gives the CUDA op's outputs; autograd keeps its five inputs, as the default
  ``autograd.Function`` does on a GPU. Needs the built extension (``ops.compiled_op_available()``),
  without which CUDA tensors take the PyTorch path.
* HF's Hungarian matching runs on the host (``scipy``); here it gets an assignment of the same
  shape (queries 0..k-1 for the k targets: the memory does not depend on which queries), and
  its host reads (``isfinite(...).all()`` before a clamp) read True. Our step has no host read;
  one would stop the estimate with an error.

The backward cannot run: the autograd engine needs a CUDA device for CUDA tensors, fake or not.
So the estimate is the forward's peak plus what the step adds in the backward and optimizer:
one gradient per parameter and AdamW's two states (in the parameters' dtype). The forward's
peak includes the weights, autocast's cached low-precision weights and every activation kept
for the backward. Against the H100 run of docs/PERFORMANCE.md (commit 3313fd6, batch 16, 512 px,
bf16) this gave HF 21.28 GiB (measured 21.44) and ours, with both Swin recomputations off as
then, 14.54 GiB (measured 14.64).
"""
import argparse
import contextlib
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import _common as bench

bench.require_package()

GIB = 2**30


class StorageTracker(TorchDispatchMode):
    """Bytes of CUDA storages alive, now and at the peak (each rounded up to 512 bytes)."""

    def __init__(self, answer_host_reads):
        super().__init__()
        self.current = self.peak = 0
        self.host_reads = 0
        self.module_stack = ["(outside the modules)"]
        self.peak_in = None
        self.answer_host_reads = answer_host_reads
        self._seen = weakref.WeakKeyDictionary()

    def _release(self, nbytes):
        self.current -= nbytes

    def _track(self, tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cuda":
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes = -(-storage.nbytes() // 512) * 512
        self._seen[storage] = (nbytes, self.module_stack[-1])
        weakref.finalize(storage, self._release, nbytes)
        self.current += nbytes
        if self.current > self.peak:
            self.peak, self.peak_in = self.current, self.module_stack[-1]

    def alive_by_module(self, depth):
        """GiB alive now by the module that allocated it, down to ``depth`` name parts (list
        indices merged: "pixel_decoder.encoder.*")."""
        totals = {}
        for nbytes, module_name in self._seen.values():
            label = ".".join("*" if part.isdigit() else part for part in module_name.split(".")[:depth])
            totals[label] = totals.get(label, 0) + nbytes / GIB
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            if not self.answer_host_reads:
                raise RuntimeError("the training step reads a device value on the host (a GPU sync)")
            self.host_reads += 1
            return True if args[0].dtype == torch.bool else 1
        output = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(output)[0]:
            self._track(leaf)
        return output


class EfficientAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` through the memory-efficient kernel, as on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if mask is not None:
            if mask.dtype == torch.bool:
                zero = torch.zeros((), dtype=query.dtype, device=query.device)
                mask = torch.where(mask, zero, torch.full_like(zero, float("-inf")))
            mask = mask.to(query.dtype).expand(*query.shape[:-1], key.shape[-2])
        output = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, mask, True, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
            scale=kwargs.get("scale"))
        return output[0]


@contextlib.contextmanager
def cuda_autocast(dtype):
    """CUDA's autocast switched on by hand, entered and left as ``torch.autocast`` does."""
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_enabled("cuda", True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def to_fake_cuda(model, fake_mode):
    """Parameters and buffers replaced in place by fake CUDA tensors (``model.to`` cannot move
    fake tensors)."""
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                fake = fake_mode.from_tensor(parameter.detach()).to("cuda")
                module._parameters[name] = torch.nn.Parameter(fake, requires_grad=parameter.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = fake_mode.from_tensor(buffer).to("cuda")


def _plain_copy(values, device, dtype=None):
    """``host_to_device.to_device_async`` without pinned memory (a fake CPU tensor cannot be pinned)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return tensor.to(device) if dtype is None else tensor.to(device, dtype)


def _shape_only_assignment(cost):
    """In place of ``scipy.optimize.linear_sum_assignment``: queries 0..k-1 for the k targets."""
    import numpy as np

    count = min(cost.shape)
    return np.arange(count), np.arange(count)


def estimate(name, build, forward, amp_dtype, answer_host_reads=False, depth=1):
    """Estimate for one model; ``build()`` -> CPU model, ``forward(model)`` -> scalar loss."""
    started = time.perf_counter()
    model = build()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = StorageTracker(answer_host_reads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast and device warnings of a machine without CUDA
        with fake_mode, tracker, EfficientAttention():
            to_fake_cuda(model, fake_mode)
            model.train()
            hooks = []
            for module_name, module in model.named_modules():
                if module_name:
                    hooks.append(module.register_forward_pre_hook(
                        lambda _m, _i, module_name=module_name: tracker.module_stack.append(module_name)))
                    hooks.append(module.register_forward_hook(lambda _m, _i, _o: tracker.module_stack.pop() and None))
            weights = tracker.current
            with cuda_autocast(amp_dtype):
                loss = forward(model)
            forward_end = tracker.current
            alive = tracker.alive_by_module(depth)
            del loss
            for hook in hooks:
                hook.remove()
    parameter_bytes = sum(-(-p.numel() * p.element_size() // 512) * 512 for p in model.parameters() if p.requires_grad)
    row = {
        "model": name, "weights_gib": weights / GIB, "forward_end_gib": forward_end / GIB,
        "forward_peak_gib": tracker.peak / GIB, "gradients_and_adamw_gib": 3 * parameter_bytes / GIB,
        "estimate_gib": (tracker.peak + 3 * parameter_bytes) / GIB, "host_reads": tracker.host_reads,
        "seconds": time.perf_counter() - started, "forward_peak_in": tracker.peak_in,
        "forward_end_by_module_gib": alive,
    }
    print(f"  {name}: weights {row['weights_gib']:.2f}, forward end {row['forward_end_gib']:.2f}, forward peak "
          f"{row['forward_peak_gib']:.2f} (in {row['forward_peak_in']}), + gradients and AdamW {row['gradients_and_adamw_gib']:.2f} = "
          f"**{row['estimate_gib']:.2f} GiB** ({row['seconds']:.0f} s)", flush=True)
    print("    alive at the forward's end, by the module that allocated it (GiB): " + ", ".join(
        f"{label} {gib:.2f}" for label, gib in alive.items() if gib >= 0.01), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=None, help="image side (512; small: 64)")
    parser.add_argument("--amp", choices=("bfloat16", "float16", "none"), default="bfloat16")
    parser.add_argument("--small", action="store_true", help="tiny shapes (bench_gpu_throughput's 'small')")
    parser.add_argument("--variant", nargs="+", action="append", metavar="NAME [KEY VALUE ...]",
                        help="our model with these config overrides (default: one variant, the config as it is)")
    parser.add_argument("--depth", type=int, default=1,
                        help="attribute memory to submodules down to this many name parts")
    parser.add_argument("--skip-hf", action="store_true")
    bench.add_json_argument(parser)
    args = parser.parse_args()

    shape_name = "small" if args.small else "full"
    shape = bench.SHAPES[shape_name]
    size = args.image_size or shape["image"]
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}[args.amp]
    records = bench.ddl_records(args.batch, size)
    print(f"training step on a GPU, estimated without one: batch {args.batch}, {size} px, autocast {args.amp}, "
          f"{'small' if args.small else 'paper'} shapes (torch {torch.__version__})", flush=True)

    import ddl_mask2former.modeling.meta_arch as meta_arch

    meta_arch.to_device_async = _plain_copy
    results = {"batch": args.batch, "image": size, "amp": args.amp, "shape": shape_name, "ours": []}
    for name, *overrides in args.variant or [["defaults"]]:
        def build_ours(overrides=overrides):
            overrides = [*overrides, "MODEL.DDL.PIXEL_DECODER.REGISTERED_OP", "True"]  # see the docstring
            return bench.build_ours(bench.PAPER_CONFIG, torch.device("cpu"), shape_name, overrides)[0]

        def forward_ours(model):
            return sum(model(records).values())
        results["ours"].append(estimate(f"ours {name}", build_ours, forward_ours, amp_dtype, depth=args.depth))
        results["ours"][-1]["overrides"] = overrides

    if not args.skip_hf:
        try:
            import transformers.models.mask2former.modeling_mask2former as hf_mask2former
        except ImportError:
            print("  HF: transformers is not installed (pip install transformers), skipped")
        else:
            hf_mask2former.linear_sum_assignment = _shape_only_assignment

            def forward_hf(model):
                pixel_values, mask_labels, class_labels = bench.hf_batch(records, torch.device("cuda"))
                return model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss
            results["hf"] = estimate("HF", lambda: bench.build_hf(shape, torch.device("cpu")), forward_hf, amp_dtype,
                                     answer_host_reads=True, depth=args.depth + 2)
            for row in results["ours"]:
                row["ratio_to_hf"] = row["estimate_gib"] / results["hf"]["estimate_gib"]
                print(f"  {row['model']} / HF: {row['ratio_to_hf']:.3f}")
    bench.write_json(args.json, results)


if __name__ == "__main__":
    main()
