"""Fixed high-pass noise residuals as extra input channels (an option beyond the paper).

Forgeries leave their most generic traces in the image's high-frequency residual: a spliced
or re-synthesized region has another noise level, another JPEG history or resampling
correlations. An ImageNet-pretrained backbone (the paper's setting) already has filters that
pick these up; a backbone trained from scratch (the CPU quickstart) must first learn to
separate a residual of a few gray levels from content a hundred times stronger. Giving it
the residuals of the classic steganalysis (SRM) filters, computed on the 0-255 pixels and
truncated, removes that first step. Enabled by ``MODEL.DDL.NOISE_RESIDUALS``; off by default.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .precision import float32_region


# Second-order horizontal residual, the 3x3 "KB" square and the 5x5 "KV" square of the SRM set.
_SECOND_ORDER = [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, -2, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
_KB = [[0, 0, 0, 0, 0], [0, -1, 2, -1, 0], [0, 2, -4, 2, 0], [0, -1, 2, -1, 0], [0, 0, 0, 0, 0]]
_KV = [[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]]
_KERNELS = [(_SECOND_ORDER, 2.0), (_KB, 4.0), (_KV, 12.0)]


class NoiseResiduals(nn.Module):
    """(B, C, H, W) 0-255 pixels -> (B, C * 3, H, W) truncated high-pass residuals.

    Each input channel is filtered with three fixed kernels; residuals are divided by
    ``scale`` gray levels and clipped to [-truncation, truncation] so that strong edges do not
    swamp the noise-level differences that matter.
    """

    def __init__(self, in_channels=3, scale=4.0, truncation=3.0):
        super().__init__()
        kernels = torch.tensor([k for k, _ in _KERNELS], dtype=torch.float32)
        kernels /= torch.tensor([n for _, n in _KERNELS], dtype=torch.float32).view(-1, 1, 1)
        # Depthwise: every input channel gets all kernels.
        weight = kernels[None].expand(in_channels, -1, -1, -1).reshape(-1, 1, 5, 5)
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.in_channels = in_channels
        self.scale = scale
        self.truncation = truncation

    @property
    def out_channels(self):
        return self.weight.shape[0]

    def forward(self, pixels):
        # Always float32, also under autocast: in bfloat16 the kernels' taps (multiples of 1/12)
        # round, the kernels stop summing to zero, and a flat gray-200 image gets a residual of
        # about 1.2 gray levels: as large as the traces, and absent from float32 inference, so a
        # model trained with bfloat16 autocast saw other residuals than it was evaluated on.
        with float32_region(pixels.device.type):
            residual = F.conv2d(F.pad(pixels.float(), (2, 2, 2, 2), mode="replicate"), self.weight,
                                groups=self.in_channels)
            return (residual / self.scale).clamp(-self.truncation, self.truncation)
