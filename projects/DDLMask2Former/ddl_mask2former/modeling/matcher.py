"""Hungarian matching of query predictions to localization targets.

Each target j has a mask and a class label c_j (an index into ``MODEL.DDL.TARGET_CLASSES``).
Cost of assigning query i to target j:
    class_weight * (-sigmoid(confidence_i[c_j]))
  + mask_weight  * mean BCE(mask_i, target_j)      on sampled points
  + dice_weight  * Dice(mask_i, target_j)          on sampled points
Points are drawn uniformly at random in [0, 1]^2, the same points for every query and target
of an image. Pixels marked ignore (padding) carry zero weight in both mask costs.
The optimal one-to-one assignment comes from ``scipy.optimize.linear_sum_assignment``.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from detectron2.projects.point_rend.point_features import point_sample


def pairwise_mask_costs(mask_logits, targets, weights):
    """Pairwise BCE and Dice costs.

    Args:
        mask_logits: (Q, P) predicted logits at P points.
        targets: (T, P) float {0, 1} target values at the same points.
        weights: (P,) float point weights (0 = ignore).
    Returns:
        (bce, dice), both (Q, T).
    """
    w = weights.unsqueeze(0)
    total = weights.sum().clamp(min=1.0)
    pos = F.softplus(-mask_logits) * w  # -log(sigmoid(x)), cost of target 1
    neg = F.softplus(mask_logits) * w  # -log(1 - sigmoid(x)), cost of target 0
    bce = (pos @ targets.T + neg @ (1 - targets).T) / total
    probs = mask_logits.sigmoid() * w
    weighted_targets = targets * w
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1, keepdim=True) + weighted_targets.sum(-1).unsqueeze(0)
    dice = 1 - (numerator + 1) / (denominator + 1)
    return bce, dice


class HungarianMatcher(nn.Module):
    """forward(outputs, targets) -> list of (query_indices, target_indices) int64 tensors per image."""

    def __init__(self, class_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=12544):
        super().__init__()
        if class_weight == 0 and mask_weight == 0 and dice_weight == 0:
            raise ValueError("matcher: all cost weights are zero")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    def cost_matrix(self, logits, mask_logits, target_masks, target_labels, valid):
        """(Q, T) cost for one image: logits (Q, K), mask_logits (Q,h,w), target_masks (T,H,W),
        target_labels (T,) class indices, valid (H,W)."""
        coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        pred_points = point_sample(mask_logits[:, None].float(), coords.expand(mask_logits.shape[0], -1, -1),
                                   align_corners=False).squeeze(1)
        tgt_points = point_sample(target_masks[:, None].float(), coords.expand(target_masks.shape[0], -1, -1),
                                  align_corners=False, mode="nearest").squeeze(1)
        weights = point_sample(valid[None, None].float(), coords, align_corners=False, mode="nearest").view(-1)
        bce, dice = pairwise_mask_costs(pred_points, tgt_points, weights)
        cost_class = -logits.float().sigmoid()[:, target_labels]
        return self.class_weight * cost_class + self.mask_weight * bce + self.dice_weight * dice

    @torch.no_grad()
    def forward(self, outputs, targets):
        """
        Args:
            outputs: {"pred_logits": (B, Q, K), "pred_masks": (B, Q, h, w)}
            targets: per image {"masks": (T, H, W) bool/float, "labels": (T,) int64, "valid": (H, W) bool}
        """
        indices = []
        for b, target in enumerate(targets):
            device = outputs["pred_logits"].device
            if target["masks"].shape[0] == 0:
                empty = torch.empty(0, dtype=torch.int64, device=device)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(
                outputs["pred_logits"][b], outputs["pred_masks"][b], target["masks"], target["labels"],
                target["valid"],
            )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (torch.as_tensor(rows.astype(np.int64), device=device), torch.as_tensor(cols.astype(np.int64), device=device))
            )
        return indices
