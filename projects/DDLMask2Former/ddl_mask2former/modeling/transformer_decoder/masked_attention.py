"""Masked-attention transformer decoder (paper eq. 1-2).

N learnable queries pass through L layers. Layer l attends to one level of the pixel decoder's
multi-scale features (levels cycle coarse -> fine) with masked cross-attention, then self-
attention, then an FFN (post-norm). The attention mask of layer l comes from the mask predicted
before it: a query may attend only to positions where its previous mask probability is > 0.5;
a query whose mask would hide every position attends everywhere instead (no empty softmax).

After the initial queries and after every layer, each query predicts a foreground-confidence
logit and a mask (an MLP embedding dotted with the per-pixel embeddings P). All L + 1
predictions are supervised (deep supervision); the last one is the model's output.

Speed note: the attention mask for a level of size (h, w) needs the predicted mask at that
size. Bilinear resizing is linear in the channels, so resize(e . P) == e . resize(P): P is
resized once per level and the full-resolution masks are computed only where they are needed
(every layer in training, the last layer at inference). When a level is smaller by an even
factor s (the usual 2, 4, 8), bilinear resizing without antialiasing reads just two pixels per
axis, s/2 - 1 and s/2 of each block of s, with weight 1/2 each: a 2x2 average with stride s,
which ``downsample_bilinear`` computes directly (equal to ``F.interpolate``; on the CPU,
whose bilinear kernel first copies an NCHW input to channels-last, 3-6x faster).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from ..position_encoding import SinePositionEmbedding
from .build import TRANSFORMER_DECODER_REGISTRY


def downsample_bilinear(features, size):
    """``F.interpolate(features, size, mode="bilinear", align_corners=False)`` for (..., H, W) maps.

    With H and W multiples of the output size by even factors (fy, fx), output pixel i sits at
    input coordinate fy * i + fy / 2 - 1/2, halfway between rows fy * i + fy / 2 - 1 and
    fy * i + fy / 2: the average of that 2x2 block, taken by a stride-(fy, fx) average pool. Any
    other size goes to ``F.interpolate``.
    """
    if torch.jit.is_tracing():
        # The ONNX exporter's trace: the pool's stride would be read from traced sizes, which
        # ONNX wants constant; the resize takes them as inputs (same values, see above).
        return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)
    height, width = features.shape[-2:]
    out_height, out_width = size
    factor_y, factor_x = height // out_height, width // out_width
    if (factor_y * out_height, factor_x * out_width) == (height, width) and factor_y % 2 == 0 and factor_x % 2 == 0:
        cropped = features[..., factor_y // 2 - 1:, factor_x // 2 - 1:]
        return F.avg_pool2d(cropped, kernel_size=2, stride=(factor_y, factor_x))
    return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)


class Attention(nn.Module):
    """Multi-head attention on (B, L, C) tensors with an optional boolean keep-mask."""

    def __init__(self, dim, num_heads, dropout=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x):
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, query, key, value, keep_mask=None):
        """keep_mask: bool (B, 1, Lq, Lk), True where a query may attend."""
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        dropout = self.dropout if self.training else 0.0
        if keep_mask is not None and torch.onnx.is_in_onnx_export():
            out = _onnx_masked_attention(q, k, v, keep_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(query.shape)
        return self.out_proj(out)


# Masked logits are raised to (row maximum - this) before the softmax of the ONNX graph.
_ONNX_MASK_MARGIN = 80.0


def _onnx_masked_attention(q, k, v, keep_mask):
    """``scaled_dot_product_attention`` with a boolean ``keep_mask``, as traced into an ONNX graph.

    ONNX Runtime's ``Softmax`` is several times slower on rows holding -inf (the exporter's
    masked SDPA) than on finite rows: exponentials far below the row maximum come out subnormal.
    Here every logit is raised to at least (the row's maximum over kept positions - 80) before the
    softmax: a masked position's weight is then at most exp(-80) ~ 1.8e-35 of the largest one
    instead of 0, as is a kept position that far below, which no float32 sum of weights >= 1
    registers. Every row keeps at least one position (``_predict``), so the maximum is finite and
    the exporter's NaN clean-up for fully masked rows is not needed.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    bias = torch.zeros_like(keep_mask, dtype=q.dtype).masked_fill(~keep_mask, float("-inf"))
    logits = torch.matmul(q * scale, k.transpose(-2, -1)) + bias
    floor = logits.amax(dim=-1, keepdim=True) - _ONNX_MASK_MARGIN
    return torch.matmul(torch.maximum(logits, floor).softmax(dim=-1), v)


class DecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each residual + LayerNorm (post-norm)."""

    def __init__(self, dim, num_heads, ffn_dim, dropout):
        super().__init__()
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_self = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, queries, query_pos, memory, memory_pos, keep_mask):
        attended = self.cross_attn(queries + query_pos, memory + memory_pos, memory, keep_mask)
        queries = self.norm_cross(queries + self.dropout(attended))
        q = queries + query_pos
        queries = self.norm_self(queries + self.dropout(self.self_attn(q, q, queries)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(queries), inplace=True)))
        return self.norm_ffn(queries + self.dropout(ffn))


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MaskedAttentionDecoder(nn.Module):
    """See the module docstring; the output dict is described in ``build.py``."""

    @configurable
    def __init__(
        self,
        in_channels,
        mask_dim,
        *,
        hidden_dim=256,
        num_queries=100,
        num_heads=8,
        ffn_dim=2048,
        num_layers=9,
        num_feature_levels=3,
        dropout=0.0,
        num_classes=1,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"transformer decoder needs at least one layer, got {num_layers}")
        self.num_layers = num_layers
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.position_embedding = SinePositionEmbedding(hidden_dim // 2)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1) if in_channels != hidden_dim else nn.Identity()
            for _ in range(num_feature_levels)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        # One confidence logit per localization class (MODEL.DDL.TARGET_CLASSES).
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_dim):
        td = cfg.MODEL.DDL.TRANSFORMER_DECODER
        return {
            "in_channels": in_channels,
            "mask_dim": mask_dim,
            "hidden_dim": td.HIDDEN_DIM,
            "num_queries": td.NUM_QUERIES,
            "num_heads": td.NHEADS,
            "ffn_dim": td.DIM_FEEDFORWARD,
            "num_layers": td.DEC_LAYERS,
            "num_feature_levels": len(cfg.MODEL.DDL.PIXEL_DECODER.DEFORM_IN_FEATURES),
            "dropout": td.DROPOUT,
            "num_classes": len(cfg.MODEL.DDL.TARGET_CLASSES),
        }

    def _predict(self, queries, mask_features, level_mask_features, full_mask):
        """Confidence logits, full-res mask logits (or None), and the keep-mask for the next level."""
        normed = self.decoder_norm(queries)
        logits = self.class_embed(normed)
        embedding = self.mask_embed(normed)
        masks = torch.einsum("bqc,bchw->bqhw", embedding, mask_features) if full_mask else None
        keep = None
        if level_mask_features is not None:
            small = torch.einsum("bqc,bchw->bqhw", embedding, level_mask_features)
            keep = (small > 0).flatten(2).detach()  # sigmoid > 0.5  <=>  logit > 0
            keep = keep | ~keep.any(dim=-1, keepdim=True)  # a fully masked row attends everywhere
            keep = keep.unsqueeze(1)  # broadcast over heads
        return logits, masks, keep

    def forward(self, multi_scale_features, mask_features, all_masks=True):
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(
                f"transformer decoder expects {self.num_feature_levels} feature levels, "
                f"got {len(multi_scale_features)}"
            )
        batch = mask_features.shape[0]
        memories, memory_pos, level_mask_features = [], [], []
        for level, feature in enumerate(multi_scale_features):
            memory_pos.append(self.position_embedding(feature).flatten(2).transpose(1, 2))
            projected = self.input_proj[level](feature).flatten(2).transpose(1, 2)
            memories.append(projected + self.level_embed.weight[level])
            level_mask_features.append(downsample_bilinear(mask_features, feature.shape[-2:]))

        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_pos.weight.unsqueeze(0).expand(batch, -1, -1)
        predictions = []
        logits, masks, keep = self._predict(queries, mask_features, level_mask_features[0], all_masks)
        predictions.append((logits, masks))
        for index, layer in enumerate(self.layers):
            level = index % self.num_feature_levels
            queries = layer(queries, query_pos, memories[level], memory_pos[level], keep)
            last = index == self.num_layers - 1
            next_level = None if last else level_mask_features[(index + 1) % self.num_feature_levels]
            logits, masks, keep = self._predict(queries, mask_features, next_level, all_masks or last)
            predictions.append((logits, masks))

        final_logits, final_masks = predictions[-1]
        aux = [{"pred_logits": lg, "pred_masks": mk} for lg, mk in predictions[:-1]] if all_masks else []
        return {"pred_logits": final_logits, "pred_masks": final_masks, "aux_outputs": aux}
