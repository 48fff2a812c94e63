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

from .transfer import to_device_async


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


def batched_mask_costs(mask_logits, targets, weights, owner):
    """Pairwise BCE and Dice costs of every image's queries against every target of the batch.

    Args:
        mask_logits: (B, Q, P) predicted logits at each image's P points.
        targets: (T, P) float {0, 1} target values, each at its own image's points.
        weights: (B, P) float point weights of each image (0 = ignore).
        owner: (T,) int64 image of each target.
    Returns:
        (bce, dice), both (B, Q, T); only the entries of a target's own image
        (``[owner[t], :, t]``) are meaningful, and they equal ``pairwise_mask_costs`` of that image.
    """
    w = weights.unsqueeze(1)  # (B, 1, P)
    total = weights.sum(-1).clamp(min=1.0)[:, None, None]
    pos = F.softplus(-mask_logits) * w
    neg = F.softplus(mask_logits) * w
    bce = (pos @ targets.T + neg @ (1 - targets).T) / total
    probs = mask_logits.sigmoid() * w
    numerator = 2 * probs @ targets.T
    weighted_targets = (targets * weights[owner]).sum(-1)  # (T,), each with its own image's weights
    denominator = probs.sum(-1, keepdim=True) + weighted_targets
    dice = 1 - (numerator + 1) / (denominator + 1)
    return bce, dice


class MatchedPairs:
    """Matches of one supervised prediction, flattened over the batch (all int64, on the device).

    ``batch``, ``query``, ``target``: (N,) image, query and target of each matched pair, in the
    order of ``target``, which indexes the batch's concatenated targets. ``targets_in_order``
    (known on the host) is True when ``target`` is exactly 0..T-1: every target matched, in order
    (always, unless an image has more targets than there are queries).
    """

    def __init__(self, batch, query, target, targets_in_order=False):
        self.batch, self.query, self.target = batch, query, target
        self.targets_in_order = targets_in_order


class HungarianMatcher(nn.Module):
    """forward(outputs, targets) -> list of (query_indices, target_indices) int64 tensors per image.

    ``match_layers(list_of_outputs, targets)`` matches several supervised predictions (the final
    one and every deep-supervision layer) at once: the cost matrices of all layers and images
    are computed on the device in one batched computation per layer and reach the host in ONE
    copy; ``linear_sum_assignment`` then runs per (layer, image). When no image has more than one
    target (``TARGET_CLASSES ["forged"]``), the assignment is the cheapest query of each image's
    single target (what ``linear_sum_assignment`` returns for one column), taken on the device:
    no host round trip at all.
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

    def cost_matrix(self, logits, mask_logits, target_masks, target_labels, valid):
        """(Q, T) cost for one image: logits (Q, K), mask_logits (Q,h,w), target_masks (T,H,W),
        target_labels (T,) class indices, valid (H,W)."""
        owner = torch.zeros(target_masks.shape[0], dtype=torch.int64, device=mask_logits.device)
        return self.batched_costs(logits[None], mask_logits[None], target_masks, target_labels, owner, valid[None])[0]

    def batched_costs(self, logits, mask_logits, target_masks, target_labels, owner, valid):
        """(B, Q, T) costs: logits (B, Q, K), mask_logits (B, Q, h, w), the batch's targets
        concatenated (target_masks (T, H, W), target_labels (T,), owner (T,) image index) and
        valid (B, H, W). One set of ``num_points`` random points per image."""
        batch = mask_logits.shape[0]
        coords = torch.rand(batch, self.num_points, 2, device=mask_logits.device)
        pred_points = point_sample(mask_logits.float(), coords, align_corners=False)  # (B, Q, P)
        tgt_points = point_sample(target_masks[:, None].float(), coords[owner], align_corners=False,
                                  mode="nearest").squeeze(1)
        weights = point_sample(valid[:, None].float(), coords, align_corners=False, mode="nearest").squeeze(1)
        bce, dice = batched_mask_costs(pred_points, tgt_points, weights, owner)
        cost_class = -logits.float().sigmoid()[:, :, target_labels]
        return self.class_weight * cost_class + self.mask_weight * bce + self.dice_weight * dice

    @torch.no_grad()
    def match_layers(self, layer_outputs, targets):
        """Match each of ``layer_outputs`` (dicts with pred_logits (B, Q, K), pred_masks
        (B, Q, h, w)) to ``targets`` (see ``forward``). Returns one ``MatchedPairs`` per layer."""
        device = layer_outputs[0]["pred_logits"].device
        counts = [int(t["masks"].shape[0]) for t in targets]
        queries = layer_outputs[0]["pred_logits"].shape[1]
        empty = torch.empty(0, dtype=torch.int64, device=device)
        if sum(counts) == 0:
            return [MatchedPairs(empty, empty, empty) for _ in layer_outputs]
        with_targets = [b for b, count in enumerate(counts) if count]
        index = to_device_async(with_targets, device, torch.int64)
        owner_local = to_device_async([local for local, b in enumerate(with_targets) for _ in range(counts[b])],
                                      device, torch.int64)
        target_masks = torch.cat([targets[b]["masks"] for b in with_targets])
        target_labels = torch.cat([targets[b]["labels"] for b in with_targets])
        valid = torch.stack([targets[b]["valid"] for b in with_targets])
        costs = []
        for outputs in layer_outputs:
            logits, masks = outputs["pred_logits"], outputs["pred_masks"]
            if len(with_targets) < len(counts):
                logits, masks = logits[index], masks[index]
            costs.append(self.batched_costs(logits, masks, target_masks, target_labels, owner_local, valid))
        offsets = [0]
        for b in with_targets:
            offsets.append(offsets[-1] + counts[b])

        if max(counts) == 1:
            # One target per image: its cheapest query (linear_sum_assignment on one column).
            column = torch.arange(len(with_targets), device=device)
            batch_idx = index
            target_idx = torch.arange(len(with_targets), device=device)
            return [MatchedPairs(batch_idx, cost[column, :, column].argmin(-1), target_idx, True) for cost in costs]

        host = torch.stack(costs).cpu().numpy()  # the one device->host copy of the step's matching
        per_layer = []
        for layer_costs in host:
            batch_idx, query_idx, target_idx = [], [], []
            for local, image in enumerate(with_targets):
                rows, cols = linear_sum_assignment(layer_costs[local, :, offsets[local]: offsets[local + 1]])
                by_target = np.argsort(cols, kind="stable")
                rows, cols = rows[by_target], cols[by_target]
                batch_idx.append(np.full(len(rows), image, dtype=np.int64))
                query_idx.append(rows.astype(np.int64))
                target_idx.append(cols.astype(np.int64) + offsets[local])
            per_layer.append(np.stack([np.concatenate(batch_idx), np.concatenate(query_idx),
                                       np.concatenate(target_idx)]))
        in_order = all(np.array_equal(layer[2], np.arange(offsets[-1])) for layer in per_layer)
        flat = torch.from_numpy(np.stack(per_layer)).to(device)  # (L, 3, N): one host->device copy
        return [MatchedPairs(layer[0], layer[1], layer[2], in_order) for layer in flat]

    @torch.no_grad()
    def forward(self, outputs, targets):
        """
        Args:
            outputs: {"pred_logits": (B, Q, K), "pred_masks": (B, Q, h, w)}
            targets: per image {"masks": (T, H, W) bool/float, "labels": (T,) int64, "valid": (H, W) bool}
        Returns:
            per image, (query_indices, target_indices) with target indices local to the image.
        """
        pairs = self.match_layers([outputs], targets)[0]
        device = outputs["pred_logits"].device
        starts, position = [], 0
        for target in targets:
            starts.append(position)
            position += int(target["masks"].shape[0])
        indices = []
        for b, start in enumerate(starts):
            chosen = pairs.batch == b
            indices.append((pairs.query[chosen].to(device), (pairs.target[chosen] - start).to(device)))
        return indices
