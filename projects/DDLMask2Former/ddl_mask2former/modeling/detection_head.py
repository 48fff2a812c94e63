"""Image-level detection head: one linear layer over pooled backbone maps.

Pooling (``MODEL.DDL.DET_HEAD.POOLING``):
* ``"avg"`` (the paper's light head): global average pooling of each ``in_features`` map,
  concatenated, then the linear layer.
* ``"max"``: the same linear layer scores every position (a 1x1 convolution; maps of several
  features are average-pooled to the coarsest one's grid and their scores summed), and the image
  logit is the highest position score. A small forged region then decides the verdict at any
  image size, instead of being diluted by the authentic area around it, and a training crop and
  a whole test image are scored alike.
Both have the same parameters, so a checkpoint loads into either. With ``image_sizes`` (a
batch of images of several sizes, padded to the largest), max pooling skips the grid cells that
hold no pixel of their image, only the padding around it; a cell partly inside the image keeps
its score (the padding of a single image never fills a whole cell: it is less than a stride).
"""
import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("avg", "max")


class DetectionHead(nn.Module):
    """forward(features) -> (B,) real/fake logits from the pooled ``in_features`` maps."""

    def __init__(self, in_channels, in_features=("res5",), dropout=0.0, pooling="avg"):
        """
        Args:
            in_channels: dict feature name -> channels (the backbone's output channels).
            in_features: names pooled and concatenated before the linear layer.
            pooling: "avg" or "max" (see the module docstring).
        """
        super().__init__()
        missing = [f for f in in_features if f not in in_channels]
        if missing:
            raise ValueError(f"detection head: features {missing} are not backbone outputs {list(in_channels)}")
        if pooling not in POOLINGS:
            raise ValueError(f"MODEL.DDL.DET_HEAD.POOLING must be one of {POOLINGS}, got {pooling!r}")
        self.in_features = tuple(in_features)
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(sum(in_channels[f] for f in self.in_features), 1)
        self._channels = [in_channels[f] for f in self.in_features]
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features, image_sizes=None, padded_size=None):
        """(B,) logits; ``image_sizes`` [(h, w), ...] and ``padded_size`` (H, W) of the batch's
        input tensor let max pooling skip cells of padding only (see the module docstring)."""
        if self.pooling == "avg":
            pooled = torch.cat([features[f].mean(dim=(2, 3)) for f in self.in_features], dim=1)
            return self.classifier(self.dropout(pooled)).squeeze(1)
        logits = self.position_logits(features)
        if image_sizes is not None:
            logits = logits.masked_fill(~_cells_with_pixels(logits.shape[-2:], image_sizes, padded_size,
                                                            logits.device), float("-inf"))
        return logits.flatten(1).amax(dim=1)

    def position_logits(self, features):
        """(B, h, w) score of every position of the coarsest ``in_features`` map."""
        maps = [self.dropout(features[f]) for f in self.in_features]
        grid = min((m.shape[-2:] for m in maps), key=lambda size: size[0] * size[1])
        weights = self.classifier.weight.split(self._channels, dim=1)
        logits = 0
        for feature_map, weight in zip(maps, weights):
            scores = F.conv2d(feature_map, weight[:, :, None, None])
            if scores.shape[-2:] != grid:
                scores = F.adaptive_avg_pool2d(scores, grid)
            logits = logits + scores
        return (logits + self.classifier.bias.view(1, -1, 1, 1))[:, 0]


def _cells_with_pixels(grid, image_sizes, padded_size, device):
    """(B, gh, gw) bool: whether each cell of a ``grid`` laid over the ``padded_size`` input
    holds at least one pixel of its image (row i covers input rows [i H / gh, (i + 1) H / gh))."""
    grid_h, grid_w = int(grid[0]), int(grid[1])
    rows = torch.arange(grid_h, device=device)
    cols = torch.arange(grid_w, device=device)
    masks = []
    for height, width in image_sizes:
        # first input row of cell i is i * H / gh; it holds image pixels when that is < height
        row_ok = rows * padded_size[0] < height * grid_h
        col_ok = cols * padded_size[1] < width * grid_w
        masks.append(row_ok[:, None] & col_ok[None, :])
    return torch.stack(masks)
