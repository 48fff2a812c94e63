"""Fixed 2-D sine/cosine position encoding for feature maps (the DETR family's encoding)."""
import math

import torch
from torch import nn

from .shape_cache import ShapeCache


class SinePositionEmbedding(nn.Module):
    """Maps a (B, C, H, W) feature map to a (B, 2 * num_pos_feats, H, W) position code.

    y and x coordinates of pixel centres are normalized to (0, 2*pi]; each gets ``num_pos_feats``
    channels of interleaved sin/cos at geometric frequencies. The code depends only on H, W,
    so it is cached per size and device.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, scale=2 * math.pi):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self._cache = ShapeCache()

    def _encode(self, height, width, device, dtype):
        eps = 1e-6
        y = torch.arange(1, height + 1, device=device, dtype=torch.float32)
        x = torch.arange(1, width + 1, device=device, dtype=torch.float32)
        y = y / (height + eps) * self.scale
        x = x / (width + eps) * self.scale
        exponent = 2 * (torch.arange(self.num_pos_feats, device=device) // 2) / self.num_pos_feats
        freqs = self.temperature ** exponent.to(torch.float32)
        pos_y = y[:, None] / freqs  # (H, F)
        pos_x = x[:, None] / freqs  # (W, F)
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat(
            (pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)), dim=2
        )
        return pos.permute(2, 0, 1).contiguous().to(dtype)  # (2F, H, W)

    def forward(self, feature):
        batch, _, height, width = feature.shape
        pos = self._cache.get((height, width, feature.device, feature.dtype),
                              lambda: self._encode(height, width, feature.device, feature.dtype))
        return pos.unsqueeze(0).expand(batch, -1, -1, -1)
