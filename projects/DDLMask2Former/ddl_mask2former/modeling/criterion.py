"""Localization loss L_loc = L_mask (BCE + Dice on sampled points) + L_cls (BCE on confidence).

For every supervised prediction (the final one and, with deep supervision, each earlier one)
queries are matched to targets (``HungarianMatcher``). Then:

* ``loss_cls``: BCE between each query's K confidence logits (one per class of
  ``MODEL.DDL.TARGET_CLASSES``) and the one-hot class of its matched target (all zeros when
  unmatched); unmatched queries weighted by ``no_object_weight``; the weighted mean over all
  queries and classes. With K = 1 this is the paper's foreground-confidence BCE.
* ``loss_mask`` / ``loss_dice``: for matched pairs only, on ``num_points`` points per mask
  chosen by importance sampling (PointRend-style: oversample ``oversample_ratio * num_points``
  random points, keep the ``importance_sample_ratio`` fraction the prediction is least certain
  about, fill the rest uniformly). Ignore pixels (padding, label 255) get zero weight. Summed
  over matched pairs and divided by the number of targets in the whole (distributed) batch.

Each term is multiplied by its weight and by ``loc_weight`` so the returned dict sums to
``loc_weight * L_loc`` directly. Everything runs in fp32, outside autocast.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils.comm import get_world_size


def _uncertainty(logits):
    """Points with logits near 0 are the most uncertain."""
    return -logits.abs()


def _distributed_mean_count(count, device):
    """Number of targets averaged over workers, so every worker normalizes the same way."""
    total = torch.as_tensor([float(count)], device=device)
    world = get_world_size()
    if world > 1:
        torch.distributed.all_reduce(total)
    return (total / world).clamp(min=1.0).item()


class LocalizationCriterion(nn.Module):
    def __init__(
        self,
        matcher,
        *,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
        loc_weight=1.0,
        num_points=12544,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        deep_supervision=True,
    ):
        super().__init__()
        self.matcher = matcher
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.loc_weight = loc_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision

    def _class_loss(self, logits, targets, indices):
        """logits (B, Q, K); a matched query's row is the one-hot of its target's class."""
        target = torch.zeros_like(logits)
        weight = torch.full_like(logits, self.no_object_weight)
        for b, (query_idx, target_idx) in enumerate(indices):
            target[b, query_idx, targets[b]["labels"][target_idx]] = 1.0
            weight[b, query_idx] = 1.0
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (bce * weight).sum() / weight.sum()

    def _mask_losses(self, pred_masks, targets, indices, num_masks):
        src, tgt, valid = [], [], []
        for b, (query_idx, target_idx) in enumerate(indices):
            if query_idx.numel() == 0:
                continue
            src.append(pred_masks[b, query_idx])
            tgt.append(targets[b]["masks"][target_idx].float())
            valid.append(targets[b]["valid"].float().expand(len(target_idx), -1, -1))
        if not src:
            # Keeps every mask parameter in the graph (DDP) while contributing zero.
            zero = pred_masks.sum() * 0.0
            return zero, zero
        src = torch.cat(src)[:, None]
        tgt = torch.cat(tgt)[:, None]
        valid = torch.cat(valid)[:, None]
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src, _uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            labels = point_sample(tgt, coords, align_corners=False, mode="nearest").squeeze(1)
            weights = point_sample(valid, coords, align_corners=False, mode="nearest").squeeze(1)
        point_logits = point_sample(src, coords, align_corners=False).squeeze(1)

        bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none")
        loss_mask = ((bce * weights).sum(1) / weights.sum(1).clamp(min=1.0)).sum() / num_masks
        probs = point_logits.sigmoid() * weights
        numerator = 2 * (probs * labels).sum(1)
        denominator = probs.sum(1) + (labels * weights).sum(1)
        loss_dice = (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
        return loss_mask, loss_dice

    def _single(self, outputs, targets, num_masks, suffix):
        indices = self.matcher(outputs, targets)
        loss_cls = self._class_loss(outputs["pred_logits"], targets, indices)
        loss_mask, loss_dice = self._mask_losses(outputs["pred_masks"], targets, indices, num_masks)
        scale = self.loc_weight
        return {
            f"loss_cls{suffix}": scale * self.class_weight * loss_cls,
            f"loss_mask{suffix}": scale * self.mask_weight * loss_mask,
            f"loss_dice{suffix}": scale * self.dice_weight * loss_dice,
        }

    def forward(self, outputs, targets):
        """
        Args:
            outputs: transformer decoder output dict (``pred_logits``, ``pred_masks``, ``aux_outputs``).
            targets: per image {"masks": (T, H, W) bool, "labels": (T,) int64 class indices,
                "valid": (H, W) bool}, at the padded input resolution; T may be 0.
        """
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            outputs = _to_float(outputs)
            num_masks = _distributed_mean_count(sum(t["masks"].shape[0] for t in targets),
                                                outputs["pred_logits"].device)
            losses = self._single(outputs, targets, num_masks, "")
            if self.deep_supervision:
                for index, aux in enumerate(outputs["aux_outputs"]):
                    losses.update(self._single(aux, targets, num_masks, f"_{index}"))
        return losses


def _to_float(outputs):
    converted = {k: v.float() for k, v in outputs.items() if k != "aux_outputs"}
    converted["aux_outputs"] = [{k: v.float() for k, v in aux.items()} for aux in outputs.get("aux_outputs", [])]
    return converted
