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

from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import point_sample



def batched_mask_costs(mask_logits, targets, weights):
    """Pairwise BCE and Dice costs of every image's queries against its own targets.

    Args:
        mask_logits: (B, Q, P) predicted logits at each image's P points.
        targets: (B, T, P) float {0, 1} target values at the same points.
        weights: (B, P) float point weights of each image (0 = ignore).
    Returns:
        (bce, dice), both (B, Q, T).
    """
    w = weights.unsqueeze(1)  # (B, 1, P)
    total = weights.sum(-1).clamp(min=1.0)[:, None, None]
    pos = F.softplus(-mask_logits) * w  # -log(sigmoid(x)), cost of target 1
    neg = F.softplus(mask_logits) * w  # -log(1 - sigmoid(x)), cost of target 0
    targets_t = targets.transpose(1, 2)  # (B, P, T)
    bce = (pos @ targets_t + neg @ (1 - targets_t)) / total
    probs = mask_logits.sigmoid() * w
    numerator = 2 * probs @ targets_t
    denominator = probs.sum(-1, keepdim=True) + (targets * w).sum(-1).unsqueeze(1)
    dice = 1 - (numerator + 1) / (denominator + 1)
    return bce, dice


class HungarianMatcher(nn.Module):
    """``match_layers(list_of_outputs, targets)`` matches several supervised predictions (the final
    one and every deep-supervision layer) against a batch's ``LocalizationTargets`` at once and
    returns, per layer, the (B, T) query matched to each target slot. The cost matrices of all
    images are computed on the device in one batched computation per layer and, for several
    slots, reach the host in ONE copy; ``linear_sum_assignment`` then runs per (layer, image).
    With one slot (``TARGET_CLASSES ["forged"]``) the assignment is the slot's cheapest query
    (what ``linear_sum_assignment`` returns for one column), taken on the device: no host round
    trip, and fixed shapes throughout, so the matching compiles into one graph. Empty slots get
    a query too (ignored by the losses): with a constant cost column they do not change the
    present targets' optimal assignment, as long as there are at least as many queries as slots.
    """

    @configurable
    def __init__(self, class_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=12544):
        super().__init__()
        if class_weight == 0 and mask_weight == 0 and dice_weight == 0:
            raise ValueError("matcher: all cost weights are zero")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg):
        """The costs are the localization loss weights (MODEL.DDL.LOSS), as in Mask2Former."""
        loss = cfg.MODEL.DDL.LOSS
        return {"class_weight": loss.CLASS_WEIGHT, "mask_weight": loss.MASK_WEIGHT,
                "dice_weight": loss.DICE_WEIGHT, "num_points": loss.NUM_POINTS}

    def batched_costs(self, logits, mask_logits, targets):
        """(B, Q, T) costs: logits (B, Q, K), mask_logits (B, Q, h, w), ``targets`` a
        ``LocalizationTargets``. One set of ``num_points`` random points per image."""
        batch, queries = mask_logits.shape[:2]
        coords = torch.rand(batch, self.num_points, 2, device=mask_logits.device)
        pred_points = point_sample(mask_logits.float(), coords, align_corners=False)  # (B, Q, P)
        tgt_points = point_sample(targets.masks.float(), coords, align_corners=False, mode="nearest")  # (B, T, P)
        weights = point_sample(targets.valid[:, None].float(), coords, align_corners=False, mode="nearest").squeeze(1)
        bce, dice = batched_mask_costs(pred_points, tgt_points, weights)
        slot_classes = targets.labels[:, None, :].expand(-1, queries, -1)
        cost_class = -logits.float().sigmoid().gather(2, slot_classes)
        return self.class_weight * cost_class + self.mask_weight * bce + self.dice_weight * dice

    @torch.no_grad()
    def match_layers(self, layer_outputs, targets):
        """Match each of ``layer_outputs`` (dicts with pred_logits (B, Q, K), pred_masks
        (B, Q, h, w)) to ``targets`` (``LocalizationTargets``). Returns one (B, T) int64 tensor
        per layer: the query matched to each slot (meaningless for empty slots)."""
        batch, slots = targets.present.shape
        queries = layer_outputs[0]["pred_logits"].shape[1]
        device = layer_outputs[0]["pred_logits"].device
        if slots > queries:
            raise ValueError(f"matcher: {slots} target slots per image but only {queries} queries")
        if slots == 0:
            return [torch.zeros(batch, 0, dtype=torch.int64, device=device) for _ in layer_outputs]
        costs = [self.batched_costs(o["pred_logits"], o["pred_masks"], targets) for o in layer_outputs]
        if slots == 1:
            # One slot: its cheapest query (linear_sum_assignment on one column).
            return [cost.argmin(1) for cost in costs]
        # Empty slots cost 0 for every query: a constant column leaves the optimum of the others.
        stacked = torch.stack(costs).masked_fill(~targets.present[None, :, None, :], 0.0)
        host = stacked.cpu().numpy()  # the one device->host copy of the step's matching
        matched = np.zeros((len(costs), batch, slots), dtype=np.int64)
        for layer, layer_costs in enumerate(host):
            for image, image_costs in enumerate(layer_costs):
                rows, cols = linear_sum_assignment(image_costs)
                matched[layer, image, cols] = rows
        flat = torch.from_numpy(matched).to(device)  # (L, B, T): one host->device copy
        return list(flat.unbind(0))
