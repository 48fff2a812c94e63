"""Multi-scale deformable attention as a registered PyTorch operator.

``torch.ops.ddl_mask2former.ms_deform_attn`` and its ``ms_deform_attn_backward`` are declared
with ``torch.library.custom_op``: a schema, a fake (shape-only) implementation and an autograd
formula. ``torch.compile`` therefore traces the pixel decoder through the op as one graph
instead of breaking the graph around an opaque ``autograd.Function``, and CUDA-graph capture
(``mode="reduce-overhead"``) can take the pixel decoder with the rest of the network. Used when
asked (``MODEL.DDL.PIXEL_DECODER.REGISTERED_OP``; not yet run on a GPU).

Kernels:

* CUDA tensors: the compiled kernels of ``ddl_mask2former.ops._C`` (the op is only dispatched
  there when the extension is built);
* CPU tensors: the PyTorch path for the forward and its gradients written out for the
  backward (the samples drawn again). The plain PyTorch path keeps the sampled values and needs
  no second forward, so it is the CPU default; this kernel lets the registration (schema, fake
  tensors, autograd, compilation) be tested where there is no GPU, and what the op keeps for
  the backward (its five inputs, nothing else) be counted on a CPU as it is on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ms_deform_attn_func import _load_extension, level_operands, ms_deform_attn_pytorch

__all__ = ["ms_deform_attn_op", "ms_deform_attn_backward_op"]


@torch.library.custom_op("ddl_mask2former::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    channels_per_thread: int = 0,
) -> torch.Tensor:
    """(N, Lq, M * D) in value's dtype; arguments as ``ms_deform_attn``. ``channels_per_thread``
    picks the CUDA kernels' vector width (0 = widest that fits); the CPU kernel ignores it."""
    if value.is_cuda:
        return _load_extension().ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            channels_per_thread=channels_per_thread,
        )
    with torch.no_grad():
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)


@ms_deform_attn_op.register_fake
def _forward_shape(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   channels_per_thread=0):
    batch, _, n_heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], n_heads * head_dim)


@torch.library.custom_op("ddl_mask2former::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
    channels_per_thread: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of value, sampling_locations and attention_weights, each in its input's dtype."""
    if value.is_cuda:
        grads = _load_extension().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(), channels_per_thread=channels_per_thread,
        )
        return tuple(grads)
    return _pytorch_backward(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, grad_output)


@ms_deform_attn_backward_op.register_fake
def _backward_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                     grad_output, channels_per_thread=0):
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _pytorch_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                      grad_output):
    """The PyTorch path's gradients, written out: a kernel runs below autograd, so it cannot ask
    autograd for them. Per level, the samples are drawn again and ``grid_sample``'s own backward
    gives the value and grid gradients; the weights' gradient is the samples times the output's."""
    batch, _, n_heads, head_dim = value.shape
    _, n_queries, _, _, n_points, _ = sampling_locations.shape
    grad_value = torch.zeros_like(value)
    grad_locations = torch.zeros_like(sampling_locations)
    grad_weights = torch.zeros_like(attention_weights)
    # (N*M, D, Lq), the layout the forward's sum had before it became (N, Lq, M*D).
    compute_dtype = torch.promote_types(value.dtype, sampling_locations.dtype)  # as the forward
    grad_sum = grad_output.transpose(1, 2).reshape(batch * n_heads, head_dim, n_queries).to(compute_dtype)
    sampling_grids = 2 * sampling_locations - 1
    levels = zip(spatial_shapes.tolist(), level_start_index.tolist())
    for level, ((height, width), start) in enumerate(levels):
        level_value, level_grid, level_weights = level_operands(
            value, sampling_grids, attention_weights, level, start, height, width, compute_dtype)
        samples = F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (N*M, D, P, Lq)
        weight_grad = (samples * grad_sum[:, :, None]).sum(1)  # (N*M, P, Lq)
        grad_samples = grad_sum[:, :, None] * level_weights  # (N*M, D, P, Lq)
        # interpolation 0 = bilinear, padding 0 = zeros, as the forward's grid_sample.
        value_grad, grid_grad = torch.ops.aten.grid_sampler_2d_backward(
            grad_samples, level_value, level_grid, 0, 0, False, [True, True])
        grad_value[:, start:start + height * width] = value_grad.view(
            batch, n_heads, head_dim, height * width).permute(0, 3, 1, 2)
        grad_locations[:, :, :, level] = 2 * grid_grad.view(
            batch, n_heads, n_points, n_queries, 2).permute(0, 3, 1, 2, 4)
        grad_weights[:, :, :, level] = weight_grad.view(
            batch, n_heads, n_points, n_queries).permute(0, 3, 1, 2)
    return grad_value, grad_locations, grad_weights


def _save_inputs(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, channels = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.channels_per_thread = channels


def _backward(ctx, grad_output):
    grad_value, grad_locations, grad_weights = ms_deform_attn_backward_op(
        *ctx.saved_tensors, grad_output, ctx.channels_per_thread)
    return grad_value, None, None, grad_locations, grad_weights, None


ms_deform_attn_op.register_autograd(_backward, setup_context=_save_inputs)
