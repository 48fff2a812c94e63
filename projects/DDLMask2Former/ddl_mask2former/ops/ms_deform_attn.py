"""``MSDeformAttn``: the multi-scale deformable attention layer of the pixel decoder.

Each query predicts, per head, level and point, a 2-D offset from its reference point and an
attention weight (softmax over levels x points); ``ms_deform_attn`` then gathers the values.
Initialisation follows the Deformable DETR paper: offsets start as rays around the reference
point (one direction per head, point k at distance k + 1 pixels), attention weights start
uniform (zero weight and bias), value/output projections are Xavier-uniform.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .ms_deform_attn_func import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels C of queries and values.
        n_levels: number of feature levels L.
        n_heads: attention heads M; ``d_model`` must be divisible by it.
        n_points: sampling points P per head and level.

        fp32_projections: under autocast, True (default) runs the whole layer in float32
            (sampling positions are fragile in half); False runs only the sampling offsets, the
            attention weights and the sampling in float32 and the value and output projections in
            autocast's dtype, which halves what those keep for the backward.
        registered_op: sample through the registered operator
            ``torch.ops.ddl_mask2former.ms_deform_attn`` on every device (``torch.compile``
            traces it without a graph break); False (default) uses the compiled CUDA kernels
            through an autograd.Function on CUDA and the PyTorch path elsewhere.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4,
                 fp32_projections: bool = True, registered_op: bool = False):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model={d_model} is not divisible by n_heads={n_heads}")
        if min(d_model, n_levels, n_heads, n_points) < 1:
            raise ValueError(
                f"MSDeformAttn: sizes must be positive, got d_model={d_model}, n_levels={n_levels}, "
                f"n_heads={n_heads}, n_points={n_points}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.head_dim = d_model // n_heads
        self.fp32_projections = fp32_projections
        self.registered_op = registered_op
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        # Scale each direction onto the unit square so the first point lands on a neighbour pixel.
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        point_distance = torch.arange(1, self.n_points + 1, dtype=torch.float64)
        rays = directions[:, None, None, :] * point_distance[None, None, :, None]
        rays = rays.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(rays.reshape(-1).to(self.sampling_offsets.bias.dtype))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, fp32_projections={self.fp32_projections}")

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None, level_shapes=None):
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) as (x, y) in [0, 1] (level-normalized).
            input_flatten: (N, S, C), all levels flattened level after level.
            input_spatial_shapes: (L, 2) int64 (H, W).
            input_level_start_index: (L,) int64.
            input_padding_mask: (N, S) bool, True marks padding, or None.
            level_shapes: optional [(H, W), ...] as Python ints, equal to ``input_spatial_shapes``:
                lets the PyTorch path run without reading sizes back (exporting the model).

        Returns:
            (N, Lq, C); under autocast float32 (``fp32_projections``) or autocast's dtype, else
            the inputs' dtype.
        """
        device_type = query.device.type
        if not torch.is_autocast_enabled(device_type):
            return self._attend(query, reference_points, input_flatten, input_spatial_shapes,
                                input_level_start_index, input_padding_mask, level_shapes=level_shapes)
        if self.fp32_projections:
            with torch.autocast(device_type=device_type, enabled=False):
                return self._attend(query.float(), reference_points.float(), input_flatten.float(),
                                    input_spatial_shapes, input_level_start_index, input_padding_mask,
                                    level_shapes=level_shapes)
        return self._attend(query, reference_points, input_flatten, input_spatial_shapes,
                            input_level_start_index, input_padding_mask, float32_sampling=True,
                            level_shapes=level_shapes)

    def _onnx_locations(self, offsets, reference_points, level_size_xy):
        """``reference_points + offsets / level_size_xy`` as traced into an ONNX graph: the same
        division and addition of the same values, with both operands broadcast to the flat
        (N, Lq, M * L * P * 2) layout first. ONNX Runtime broadcasts the eager form's
        (1, 1, 1, L, 1, 2) and (N, Lq, 1, L, 1, 2) operands two floats at a time, several times
        slower; the broadcast reference points are the same in every encoder layer, which ONNX
        Runtime computes once (common subexpression elimination)."""
        batch, n_queries = offsets.shape[:2]
        shape = (batch, n_queries, self.n_heads, self.n_levels, self.n_points, 2)
        sizes = level_size_xy[None, :, None, :].expand(self.n_heads, self.n_levels, self.n_points, 2).reshape(-1)
        references = reference_points[:, :, None, :, None, :].expand(shape).reshape(batch, n_queries, -1)
        return (references + offsets.reshape(batch, n_queries, -1) / sizes).view(shape)

    def _attend(self, query, reference_points, input_flatten, spatial_shapes, level_start_index,
                padding_mask, float32_sampling=False, level_shapes=None):
        """The layer; ``float32_sampling``: offsets, weights and sampling in float32 with autocast
        off, the two projections under the caller's autocast."""
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"MSDeformAttn: query must be (N, Lq, {self.d_model}), got {tuple(query.shape)}")
        batch, n_queries, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != batch or input_flatten.shape[-1] != self.d_model:
            raise ValueError(
                f"MSDeformAttn: input_flatten must be ({batch}, S, {self.d_model}), got {tuple(input_flatten.shape)}"
            )
        total_len = input_flatten.shape[1]
        if spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(
                f"MSDeformAttn: input_spatial_shapes must be ({self.n_levels}, 2), got {tuple(spatial_shapes.shape)}"
            )
        if reference_points.shape != (batch, n_queries, self.n_levels, 2):
            raise ValueError(
                f"MSDeformAttn: reference_points must be ({batch}, {n_queries}, {self.n_levels}, 2) as (x, y), "
                f"got {tuple(reference_points.shape)}"
            )

        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            if padding_mask.shape != (batch, total_len) or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"MSDeformAttn: input_padding_mask must be bool ({batch}, {total_len}), got "
                    f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, total_len, self.n_heads, self.head_dim)

        sampling_context = (torch.autocast(device_type=query.device.type, enabled=False) if float32_sampling
                            else contextlib.nullcontext())
        with sampling_context:
            if float32_sampling:
                query, reference_points = query.float(), reference_points.float()
            offsets = self.sampling_offsets(query).view(
                batch, n_queries, self.n_heads, self.n_levels, self.n_points, 2)
            weights = self.attention_weights(query).view(
                batch, n_queries, self.n_heads, self.n_levels * self.n_points)
            weights = weights.softmax(-1).view(batch, n_queries, self.n_heads, self.n_levels, self.n_points)

            # Offsets are in pixels of each level; divide by (W, H) to move in normalized coordinates.
            level_size_xy = spatial_shapes.flip(-1).to(offsets.dtype)
            if torch.onnx.is_in_onnx_export():
                sampling_locations = self._onnx_locations(offsets, reference_points, level_size_xy)
            else:
                sampling_locations = (reference_points[:, :, None, :, None, :]
                                      + offsets / level_size_xy[None, None, None, :, None, :])
            # A half value with float32 positions is sampled in float32 (output in value's dtype).
            output = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, weights,
                                    level_shapes, registered_op=self.registered_op)
        return self.output_proj(output)
