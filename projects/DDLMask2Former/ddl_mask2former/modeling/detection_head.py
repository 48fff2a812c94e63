"""Image-level detection head: global average pooling of backbone maps, then one linear layer."""
import torch
from torch import nn


class DetectionHead(nn.Module):
    """forward(features) -> (B,) real/fake logits from the pooled ``in_features`` maps."""

    def __init__(self, in_channels, in_features=("res5",), dropout=0.0):
        """
        Args:
            in_channels: dict feature name -> channels (the backbone's output channels).
            in_features: names pooled and concatenated before the linear layer.
        """
        super().__init__()
        missing = [f for f in in_features if f not in in_channels]
        if missing:
            raise ValueError(f"detection head: features {missing} are not backbone outputs {list(in_channels)}")
        self.in_features = tuple(in_features)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(sum(in_channels[f] for f in self.in_features), 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features):
        pooled = torch.cat([features[f].mean(dim=(2, 3)) for f in self.in_features], dim=1)
        return self.classifier(self.dropout(pooled)).squeeze(1)
