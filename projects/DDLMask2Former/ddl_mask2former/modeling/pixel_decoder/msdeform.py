"""Pixel decoder: a multi-scale deformable-attention encoder plus an FPN path to stride 4.

The coarse backbone levels (``deform_in_features``, res3..res5 by default) are projected to
``conv_dim`` channels, flattened together with sine position and learned level embeddings, and
refined by ``encoder_layers`` post-norm layers of multi-scale deformable self-attention + FFN.
The finer levels (res2) are merged top-down: 1x1 lateral conv + upsampled coarser output, then
a 3x3 conv. A 1x1 conv on the finest map gives the per-pixel embeddings P (``mask_features``).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from ...ops import MSDeformAttn
from ..position_encoding import SinePositionEmbedding
from ..shape_cache import ShapeCache
from .build import PIXEL_DECODER_REGISTRY
from .recomputed_ffn import relu_ffn


def group_norm(channels):
    """GroupNorm with up to 32 groups that divide ``channels`` (small widths for tiny configs)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: multi-scale deformable self-attention, then a two-layer FFN."""

    def __init__(self, d_model, ffn_dim, n_levels, n_heads, n_points, dropout, fp32_projections=True,
                 recompute_ffn=False, registered_op=False):
        super().__init__()
        self.recompute_ffn = recompute_ffn
        self.self_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points,
                                      fp32_projections=fp32_projections, registered_op=registered_op)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, level_shapes=None):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, None,
                                  level_shapes=level_shapes)
        src = self.norm1(src + self.dropout(attended))
        if self.recompute_ffn and torch.is_grad_enabled() and not (self.training and self.dropout.p > 0):
            ffn = relu_ffn(src, self.linear1, self.linear2)  # keeps src, not the hidden (recomputed_ffn.py)
        else:
            ffn = self.linear2(self.dropout(F.relu(self.linear1(src), inplace=True)))
        return self.norm2(src + self.dropout(ffn))


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """forward(features) -> (mask_features (B, mask_dim, H/4, W/4), [coarse ... fine] maps).

    The returned multi-scale list holds the encoder outputs, lowest resolution first, each
    (B, conv_dim, h_l, w_l); the transformer decoder cycles through them.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        deform_in_features=("res3", "res4", "res5"),
        conv_dim=256,
        mask_dim=256,
        encoder_layers=6,
        encoder_heads=8,
        encoder_points=4,
        encoder_ffn_dim=1024,
        dropout=0.0,
        fp32_projections=True,
        recompute_ffn=False,
        registered_op=False,
    ):
        """
        Args:
            input_shape: dict name -> ShapeSpec of the backbone features to use (all of them
                are used; those not in ``deform_in_features`` join through the FPN path).
            deform_in_features: names of the levels fed to the deformable encoder.
            fp32_projections: see ``MSDeformAttn`` (``MODEL.DDL.PIXEL_DECODER.FP32_PROJECTIONS``).
            recompute_ffn: the encoder FFNs keep their input, not their hidden, for the backward
                (``recomputed_ffn.py``, ``MODEL.DDL.PIXEL_DECODER.RECOMPUTE_FFN``).
            registered_op: see ``MSDeformAttn`` (``MODEL.DDL.PIXEL_DECODER.REGISTERED_OP``).
        """
        super().__init__()
        missing = [f for f in deform_in_features if f not in input_shape]
        if missing:
            raise ValueError(f"pixel decoder: deformable levels {missing} are not backbone outputs {list(input_shape)}")
        ordered = sorted(input_shape.items(), key=lambda item: item[1].stride)
        self.in_features = [name for name, _ in ordered]
        # Coarsest level first, matching the order the transformer decoder consumes.
        self.deform_features = sorted(deform_in_features, key=lambda n: -input_shape[n].stride)
        self.fpn_features = [n for n in reversed(self.in_features) if n not in deform_in_features]
        finest_deform_stride = min(input_shape[n].stride for n in deform_in_features)
        if any(input_shape[n].stride > finest_deform_stride for n in self.fpn_features):
            raise ValueError("pixel decoder: FPN-only levels must be finer than every deformable level")

        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(input_shape[n].channels, conv_dim, kernel_size=1), group_norm(conv_dim))
            for n in self.deform_features
        )
        self.position_embedding = SinePositionEmbedding(conv_dim // 2)
        self.level_embed = nn.Parameter(torch.empty(len(self.deform_features), conv_dim))
        self.encoder = nn.ModuleList(
            DeformableEncoderLayer(
                conv_dim, encoder_ffn_dim, len(self.deform_features), encoder_heads, encoder_points, dropout,
                fp32_projections, recompute_ffn, registered_op,
            )
            for _ in range(encoder_layers)
        )
        self.lateral_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(input_shape[n].channels, conv_dim, kernel_size=1, bias=False), group_norm(conv_dim))
            for n in self.fpn_features
        )
        self.output_convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False), group_norm(conv_dim), nn.ReLU()
            )
            for _ in self.fpn_features
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self._reference_cache = ShapeCache()
        self._reset_parameters()

    def _reset_parameters(self):
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        nn.init.normal_(self.level_embed)
        for layer in self.encoder:
            for linear in (layer.linear1, layer.linear2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
        for seq in list(self.lateral_convs) + list(self.output_convs):
            nn.init.kaiming_uniform_(seq[0].weight, a=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        pd = cfg.MODEL.DDL.PIXEL_DECODER
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in pd.IN_FEATURES},
            "deform_in_features": tuple(pd.DEFORM_IN_FEATURES),
            "conv_dim": pd.CONV_DIM,
            "mask_dim": pd.MASK_DIM,
            "encoder_layers": pd.ENCODER_LAYERS,
            "encoder_heads": pd.ENCODER_HEADS,
            "encoder_points": pd.ENCODER_POINTS,
            "encoder_ffn_dim": pd.ENCODER_FFN_DIM,
            "dropout": pd.DROPOUT,
            "fp32_projections": pd.FP32_PROJECTIONS,
            "recompute_ffn": pd.RECOMPUTE_FFN,
            "registered_op": pd.REGISTERED_OP,
        }

    def _level_geometry(self, shapes, batch, device):
        """(spatial_shapes, level_start_index, reference points) for level sizes ``shapes``
        (Python ints), cached per sizes and device: built on the host, never read back."""
        spatial_shapes, level_start_index, ref = self._reference_cache.get(
            (tuple(shapes), device), lambda: self._build_level_geometry(shapes, device))
        return spatial_shapes, level_start_index, ref.expand(batch, -1, -1, -1)

    @staticmethod
    def _build_level_geometry(shapes, device):
        if torch.jit.is_tracing():
            # Traced sizes are 0-dim tensors: stacked, they stay functions of the input's size.
            spatial_shapes = torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in shapes])
            spatial_shapes = spatial_shapes.to(device=device, dtype=torch.long)
        else:
            spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        starts = [0]
        for height, width in shapes[:-1]:
            starts.append(starts[-1] + height * width)
        if torch.jit.is_tracing():
            level_start_index = torch.stack([torch.as_tensor(start) for start in starts]).to(device=device,
                                                                                            dtype=torch.long)
        else:
            level_start_index = torch.as_tensor(starts, dtype=torch.long, device=device)
        per_level = []
        for height, width in shapes:
            ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
            xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            per_level.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
        ref = torch.cat(per_level, dim=0)[None, :, None, :].expand(1, -1, len(shapes), 2)
        return spatial_shapes, level_start_index, ref

    def forward(self, features):
        tokens, positions, shapes = [], [], []
        for level, (name, proj) in enumerate(zip(self.deform_features, self.input_proj)):
            projected = proj(features[name])
            shapes.append(projected.shape[-2:])
            tokens.append(projected.flatten(2).transpose(1, 2))
            pos = self.position_embedding(projected).flatten(2).transpose(1, 2)
            positions.append(pos + self.level_embed[level].to(pos.dtype))
        src = torch.cat(tokens, dim=1)
        pos = torch.cat(positions, dim=1)
        if not torch.jit.is_tracing():  # traced sizes stay tensors, so the ONNX graph keeps them dynamic
            shapes = [(int(h), int(w)) for h, w in shapes]
        spatial_shapes, level_start_index, reference_points = self._level_geometry(shapes, src.shape[0], src.device)
        for layer in self.encoder:
            # The level sizes as ints too: the PyTorch path then reads nothing back (export).
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, shapes)

        batch = src.shape[0]
        multi_scale = [
            chunk.transpose(1, 2).reshape(batch, self.conv_dim, h, w)
            for chunk, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        finest = multi_scale[-1]
        for name, lateral, output in zip(self.fpn_features, self.lateral_convs, self.output_convs):
            lateral_map = lateral(features[name])
            upsampled = F.interpolate(finest, size=lateral_map.shape[-2:], mode="bilinear", align_corners=False)
            finest = output(lateral_map + upsampled)
        return self.mask_features(finest), multi_scale
