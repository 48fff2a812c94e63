"""Multi-scale deformable attention: the functional API, its PyTorch path and the dispatch.

``ms_deform_attn`` samples every head's value map at a few learned points per level
(bilinear, zero padding, pixel centers at ``(i + 0.5) / size``, i.e. ``grid_sample`` with
``align_corners=False``) and returns the attention-weighted sum of the samples.

Dispatch, decided per call:

* ``DDL_MSDA_FORCE_PYTORCH=1`` in the environment -> the PyTorch path, always;
* CUDA tensors and a built ``ddl_mask2former.ops._C`` -> the compiled CUDA kernels, through an
  ``autograd.Function`` (the path measured on a GPU), or with ``registered_op=True``
  (``MODEL.DDL.PIXEL_DECODER.REGISTERED_OP``) through the registered operator
  ``torch.ops.ddl_mask2former.ms_deform_attn`` (``registered_op.py``), which ``torch.compile``
  traces without a graph break;
* CPU tensors with ``registered_op=True`` -> the registered operator's CPU kernel;
* anything else -> the PyTorch path (a warning, once, when CUDA tensors meet a missing build).

The path in use is logged once per distinct path and reason (logger ``ddl_mask2former.ops``).
Only the "extension was not built" case is tolerated when importing ``_C``; an extension that
exists but fails to load (wrong torch, missing symbols) raises.
"""
from __future__ import annotations

import importlib
import logging
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "compiled_op_available",
    "force_pytorch_requested",
    "FORCE_PYTORCH_ENV",
]

logger = logging.getLogger("ddl_mask2former.ops")

FORCE_PYTORCH_ENV = "DDL_MSDA_FORCE_PYTORCH"
_TRUE_VALUES = {"1", "true", "yes", "on"}
_FALSE_VALUES = {"", "0", "false", "no", "off"}
_EXTENSION_MODULE = "ddl_mask2former.ops._C"

_extension = None
_extension_checked = False
# Channels per CUDA thread (0 = widest vector width that fits; 1 = one channel per thread).
_channels_per_thread = 0
_logged_paths: set[str] = set()


def _load_extension():
    """Return the compiled module, or None when it was not built (any other failure raises)."""
    global _extension, _extension_checked
    if not _extension_checked:
        try:
            extension = importlib.import_module(_EXTENSION_MODULE)
        except ModuleNotFoundError as exc:
            # Only "no such module" is the not-built case; a broken .so raises ImportError instead.
            if exc.name != _EXTENSION_MODULE:
                raise
            extension = None
        _extension = extension
        _extension_checked = True
    return _extension


def compiled_op_available() -> bool:
    """True when ``ddl_mask2former.ops._C`` was built and loads."""
    return _load_extension() is not None


def force_pytorch_requested() -> bool:
    """True when ``DDL_MSDA_FORCE_PYTORCH`` asks for the PyTorch path."""
    raw = os.environ.get(FORCE_PYTORCH_ENV, "").strip().lower()
    if raw in _TRUE_VALUES:
        return True
    if raw in _FALSE_VALUES:
        return False
    raise ValueError(
        f"environment variable {FORCE_PYTORCH_ENV}={raw!r} is not a boolean; use 1 or 0"
    )


def _log_path_once(key: str, message: str, level: int = logging.INFO) -> None:
    if torch.compiler.is_compiling():
        return  # a logger call breaks dynamo's graph; the eager calls log the path
    if key not in _logged_paths:
        _logged_paths.add(key)
        logger.log(level, message)


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Validate shapes and dtypes cheaply (no device synchronisation)."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    batch, _, n_heads, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be (L, 2) as (H, W), got {tuple(spatial_shapes.shape)}"
        )
    if spatial_shapes.dtype != torch.long or level_start_index.dtype != torch.long:
        raise TypeError(
            "ms_deform_attn: spatial_shapes and level_start_index must be int64, got "
            f"{spatial_shapes.dtype} and {level_start_index.dtype}"
        )
    n_levels = spatial_shapes.shape[0]
    if level_start_index.shape != (n_levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be ({n_levels},), got {tuple(level_start_index.shape)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got "
            f"{tuple(sampling_locations.shape)}"
        )
    n_b, n_q, n_m, n_l, n_p, _ = sampling_locations.shape
    if (n_b, n_m, n_l) != (batch, n_heads, n_levels):
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} do not match "
            f"value {tuple(value.shape)} and {n_levels} levels"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if not (value.is_floating_point() and sampling_locations.is_floating_point()
            and attention_weights.is_floating_point()):
        raise TypeError("ms_deform_attn: value, sampling_locations and attention_weights must be floating point")


def level_operands(value, sampling_grids, attention_weights, level, start, height, width, dtype):
    """One level's ``grid_sample`` operands in ``dtype``: the value map (N*M, D, H, W), the grid
    (N*M, P, Lq, 2) in [-1, 1] and the weights (N*M, 1, P, Lq). Points come before queries, so
    each point's samples are one contiguous (D, Lq) slab. Shared by the PyTorch path and the
    registered operator's CPU backward."""
    batch, _, n_heads, head_dim = value.shape
    _, n_queries, _, _, n_points, _ = sampling_grids.shape
    level_value = value[:, start:start + height * width].to(dtype).permute(0, 2, 3, 1).reshape(
        batch * n_heads, head_dim, height, width)
    level_grid = sampling_grids[:, :, :, level].permute(0, 2, 3, 1, 4).reshape(
        batch * n_heads, n_points, n_queries, 2).to(dtype)
    level_weights = attention_weights[:, :, :, level].permute(0, 2, 3, 1).reshape(
        batch * n_heads, 1, n_points, n_queries).to(dtype)
    return level_value, level_grid, level_weights


def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                           level_shapes=None):
    """Reference implementation on ``F.grid_sample``; runs on any device and dtype.

    Levels are accumulated one at a time so the per-level samples are freed early.
    ``level_shapes``: the (H, W) of each level as Python ints when the caller has them (they must
    equal ``spatial_shapes``; under the ONNX exporter's trace, traced sizes); then nothing is read
    back from the tensors, so a trace keeps the level sizes as functions of the input's size
    instead of data-dependent values.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, total_len, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    if level_shapes is None:
        level_shapes = spatial_shapes.tolist()
        level_starts = level_start_index.tolist()
    else:
        if len(level_shapes) != spatial_shapes.shape[0]:
            raise ValueError(f"ms_deform_attn: {len(level_shapes)} level_shapes for "
                             f"{spatial_shapes.shape[0]} levels in spatial_shapes")
        level_starts = [0]
        for height, width in level_shapes[:-1]:
            level_starts.append(level_starts[-1] + height * width)
    expected_len = sum(h * w for h, w in level_shapes)
    if expected_len != total_len:
        raise ValueError(
            f"ms_deform_attn: value has {total_len} positions but spatial_shapes {level_shapes} sum to {expected_len}"
        )
    onnx_export = torch.onnx.is_in_onnx_export()
    output = None
    for samples, level_weights in _sampled_levels(value, sampling_locations, attention_weights, level_shapes,
                                                  level_starts):
        if onnx_export:
            # Traced into ONNX: each level's points weighted and summed by one Mul and one
            # ReduceSum instead of a Gather, Mul and Add per point (in ONNX Runtime about 6
            # against 10 ms per level of the Swin-T model at 512 px, 1 thread). Equal to the
            # eager path up to float32 rounding (the points are summed per level, then the levels).
            contribution = (samples * level_weights).sum(dim=2)  # (N*M, D, Lq)
            output = contribution if output is None else output + contribution
            continue
        # Eager, a loop over the few points beats one (samples * weights).sum(): no
        # (N*M, D, P, Lq) product is materialized, and each step streams over contiguous memory.
        for point in range(n_points):
            contribution = samples[:, :, point] * level_weights[:, :, point]  # (N*M, D, Lq)
            output = contribution if output is None else output + contribution
    output = output.view(batch, n_heads * head_dim, n_queries)
    return output.transpose(1, 2).to(value.dtype).contiguous()


def _sampled_levels(value, sampling_locations, attention_weights, level_shapes, level_starts):
    """Per level: the bilinear samples (N*M, D, P, Lq) at the sampling locations and the
    attention weights (N*M, 1, P, Lq) that go with them."""
    # grid_sample wants [-1, 1] coordinates; x then y as in sampling_locations.
    sampling_grids = 2 * sampling_locations - 1
    # Half values with float32 positions are sampled in float32 (as the CUDA op does); the
    # output has value's dtype either way.
    compute_dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    for level, ((height, width), start) in enumerate(zip(level_shapes, level_starts)):
        level_value, level_grid, level_weights = level_operands(
            value, sampling_grids, attention_weights, level, start, height, width, compute_dtype)
        samples = F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        yield samples, level_weights


class _MSDeformAttnCUDA(torch.autograd.Function):
    """Autograd wrapper of the compiled kernels (first derivatives only)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                channels_per_thread=0):
        output = _load_extension().ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            channels_per_thread=channels_per_thread,
        )
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.channels_per_thread = channels_per_thread
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = _load_extension().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(), channels_per_thread=ctx.channels_per_thread,
        )
        return grad_value, None, None, grad_locations, grad_weights, None


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   level_shapes=None, *, registered_op=False):
    """Multi-scale deformable attention.

    Args:
        value: (N, S, M, D) per-head values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64, (H, W) of each level.
        level_start_index: (L,) int64, offset of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) as (x, y), normalized to [0, 1].
        attention_weights: (N, Lq, M, L, P).
        level_shapes: optional [(H, W), ...] of the levels as Python ints, equal to
            ``spatial_shapes``; the PyTorch path then reads nothing back from the device
            (needed to export the model; see ``ms_deform_attn_pytorch``).
        registered_op: through ``torch.ops.ddl_mask2former.ms_deform_attn`` (see the module).

    Returns:
        (N, Lq, M * D) in value's dtype.
    """
    if force_pytorch_requested():
        _log_path_once("forced", f"ms_deform_attn: PyTorch path ({FORCE_PYTORCH_ENV} is set)")
        return ms_deform_attn_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, level_shapes
        )
    if value.is_cuda:
        if _load_extension() is not None:
            _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
            if registered_op:
                _log_path_once("registered", "ms_deform_attn: compiled CUDA op (ddl_mask2former.ops._C) "
                               "through the registered operator")
                return torch.ops.ddl_mask2former.ms_deform_attn(
                    value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                    _channels_per_thread,
                )
            _log_path_once("compiled", "ms_deform_attn: compiled CUDA op (ddl_mask2former.ops._C)")
            return _MSDeformAttnCUDA.apply(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                _channels_per_thread,
            )
        _log_path_once(
            "cuda-not-built",
            "ms_deform_attn: CUDA tensors but ddl_mask2former.ops._C was not built; using the slower "
            "PyTorch path (reinstall with nvcc on PATH: pip install --no-build-isolation -e .)",
            logging.WARNING,
        )
    elif registered_op:
        _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return torch.ops.ddl_mask2former.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, 0)
    else:
        _log_path_once("pytorch-device", f"ms_deform_attn: PyTorch path ({value.device.type} tensors)")
    return ms_deform_attn_pytorch(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, level_shapes
    )
