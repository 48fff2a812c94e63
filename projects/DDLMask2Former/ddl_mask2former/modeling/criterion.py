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
``loc_weight * L_loc`` directly. Everything runs in fp32, outside autocast (only the matched
masks are cast, never all queries' masks).

Speed: all supervised predictions are matched together (``HungarianMatcher.match_layers``: at
most one device->host copy per step, none with one target per image), and the class and mask
losses of all layers are computed in one batched pass (one importance sampling over every
layer's matched masks), so the number of operators does not grow with batch x layers.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import point_sample
from detectron2.utils.comm import get_world_size

from .matcher import HungarianMatcher
from .transfer import to_device_async


def _uncertainty(logits):
    """Points with logits near 0 are the most uncertain."""
    return -logits.abs()


def _distributed_mean_count(count, device):
    """Number of targets averaged over workers, so every worker normalizes the same way: a
    float in one process; with several, a 0-dim tensor on ``device`` (reading it on the host
    would wait for the device every step)."""
    world = get_world_size()
    if world == 1:
        return max(float(count), 1.0)  # no device round trip in one process
    total = to_device_async([float(count)], device, torch.float32)
    torch.distributed.all_reduce(total)
    return (total[0] / world).clamp(min=1.0)


def uncertain_point_coords(mask_logits, num_points, oversample_ratio, importance_sample_ratio):
    """PointRend's training points for (N, 1, h, w) logits: (N, num_points, 2) in [0, 1]^2.

    Draws ``oversample_ratio * num_points`` uniform points, keeps the
    ``importance_sample_ratio * num_points`` most uncertain (logit nearest 0) and fills the rest
    with fresh uniform points (same draws and selection as detectron2's
    ``get_uncertain_point_coords_with_randomness``).
    """
    count = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(count, num_sampled, 2, device=mask_logits.device)
    uncertainty = _uncertainty(point_sample(mask_logits, coords, align_corners=False))[:, 0]
    num_uncertain = int(importance_sample_ratio * num_points)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    coords = coords.gather(1, chosen[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(count, num_random, 2, device=mask_logits.device)], dim=1)
    return coords


class LocalizationCriterion(nn.Module):
    @configurable
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

    @classmethod
    def from_config(cls, cfg):
        """Every weight from MODEL.DDL.LOSS, read once; the matcher's costs come from the same keys."""
        loss = cfg.MODEL.DDL.LOSS
        return {
            "matcher": HungarianMatcher(cfg),
            "class_weight": loss.CLASS_WEIGHT,
            "mask_weight": loss.MASK_WEIGHT,
            "dice_weight": loss.DICE_WEIGHT,
            "no_object_weight": loss.NO_OBJECT_WEIGHT,
            "loc_weight": loss.LOC_WEIGHT,
            "num_points": loss.NUM_POINTS,
            "oversample_ratio": loss.OVERSAMPLE_RATIO,
            "importance_sample_ratio": loss.IMPORTANCE_SAMPLE_RATIO,
            "deep_supervision": loss.DEEP_SUPERVISION,
        }

    def _class_losses(self, layers, labels, pairs):
        """(L,) class losses. logits of each layer (B, Q, K); a matched query's row is the one-hot
        of its target's class, unmatched rows are all zeros with weight ``no_object_weight``."""
        logits = torch.stack([layer["pred_logits"].float() for layer in layers])  # (L, B, Q, K)
        target = torch.zeros_like(logits)
        weight = torch.full_like(logits, self.no_object_weight)
        layer_idx = torch.cat([torch.full_like(p.batch, i) for i, p in enumerate(pairs)])
        batch_idx = torch.cat([p.batch for p in pairs])
        query_idx = torch.cat([p.query for p in pairs])
        class_idx = labels[torch.cat([p.target for p in pairs])]
        # A device scalar: a Python 1.0 would be copied from the host, waiting for the device.
        one = logits.new_ones(())
        target.index_put_((layer_idx, batch_idx, query_idx, class_idx), one)
        weight.index_put_((layer_idx, batch_idx, query_idx), one)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (bce * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3))

    def _mask_losses(self, layers, target_masks, target_valid, pairs, num_masks):
        """(L,) mask BCE and (L,) Dice losses over every layer's matched pairs, in one pass."""
        matches = pairs[0].batch.shape[0]
        if matches == 0:
            # Keeps every mask parameter in the graph (DDP) while contributing zero.
            zero = torch.stack([layer["pred_masks"].sum().float() * 0.0 for layer in layers])
            return zero, zero
        # Only the matched masks are gathered and cast to fp32: (L*N, 1, h, w).
        src = torch.cat([layer["pred_masks"][p.batch, p.query] for layer, p in zip(layers, pairs)])
        src = src.float()[:, None]
        with torch.no_grad():
            coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio)  # (L*N, P, 2)
            num_layers = len(layers)
            if all(p.targets_in_order for p in pairs):
                # Every layer matched every target in order: each target is sampled once, at its
                # points of all layers, (N, L*P, 2), without copying a mask per layer.
                per_target = coords.view(num_layers, matches, -1, 2).transpose(0, 1).reshape(matches, -1, 2)
                labels = point_sample(target_masks[:, None].float(), per_target, align_corners=False, mode="nearest")
                weights = point_sample(target_valid[:, None].float(), per_target, align_corners=False, mode="nearest")
                labels = labels.view(matches, num_layers, -1).transpose(0, 1).reshape(num_layers * matches, -1)
                weights = weights.view(matches, num_layers, -1).transpose(0, 1).reshape(num_layers * matches, -1)
            else:
                flat = torch.cat([p.target for p in pairs])
                labels = point_sample(target_masks[flat][:, None].float(), coords, align_corners=False,
                                      mode="nearest").squeeze(1)
                weights = point_sample(target_valid[flat][:, None].float(), coords, align_corners=False,
                                       mode="nearest").squeeze(1)
        point_logits = point_sample(src, coords, align_corners=False).squeeze(1)  # (L*N, P)

        bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none")
        per_mask_bce = (bce * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        probs = point_logits.sigmoid() * weights
        numerator = 2 * (probs * labels).sum(1)
        denominator = probs.sum(1) + (labels * weights).sum(1)
        per_mask_dice = 1 - (numerator + 1) / (denominator + 1)
        loss_mask = per_mask_bce.view(num_layers, matches).sum(1) / num_masks
        loss_dice = per_mask_dice.view(num_layers, matches).sum(1) / num_masks
        return loss_mask, loss_dice

    def forward(self, outputs, targets):
        """
        Args:
            outputs: transformer decoder output dict (``pred_logits``, ``pred_masks``, ``aux_outputs``).
            targets: per image {"masks": (T, H, W) bool, "labels": (T,) int64 class indices,
                "valid": (H, W) bool}, at the padded input resolution; T may be 0.
        """
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            layers = [outputs]
            suffixes = [""]
            if self.deep_supervision:
                layers += list(outputs["aux_outputs"])
                suffixes += [f"_{index}" for index in range(len(outputs["aux_outputs"]))]
            num_masks = _distributed_mean_count(sum(t["masks"].shape[0] for t in targets),
                                                outputs["pred_logits"].device)
            pairs = self.matcher.match_layers(layers, targets)
            labels = torch.cat([t["labels"] for t in targets])
            target_masks = torch.cat([t["masks"] for t in targets])
            # Each target's image's valid map, (T, H, W): one gather for the batch, not two calls per image.
            owners = [b for b, t in enumerate(targets) for _ in range(t["masks"].shape[0])]
            valid = torch.stack([t["valid"] for t in targets])
            target_valid = valid[to_device_async(owners, valid.device, torch.int64)]
            loss_cls = self._class_losses(layers, labels, pairs)
            loss_mask, loss_dice = self._mask_losses(layers, target_masks, target_valid, pairs, num_masks)
            scale = self.loc_weight
            loss_cls = scale * self.class_weight * loss_cls
            loss_mask = scale * self.mask_weight * loss_mask
            loss_dice = scale * self.dice_weight * loss_dice
            losses = {}
            for index, suffix in enumerate(suffixes):
                losses[f"loss_cls{suffix}"] = loss_cls[index]
                losses[f"loss_mask{suffix}"] = loss_mask[index]
                losses[f"loss_dice{suffix}"] = loss_dice[index]
        return losses
