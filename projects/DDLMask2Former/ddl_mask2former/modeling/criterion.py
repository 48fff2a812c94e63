"""Localization loss L_loc = L_mask (BCE + Dice on sampled points) + L_cls (BCE on confidence).

For every supervised prediction (the final one and, with deep supervision, each earlier one)
queries are matched to targets (``HungarianMatcher``). Then:

* ``loss_cls``: BCE between each query's K confidence logits (one per class of
  ``MODEL.DDL.TARGET_CLASSES``) and the one-hot class of its matched target (all zeros when
  unmatched); unmatched queries weighted by ``no_object_weight``; the weighted mean over all
  queries and classes. With K = 1 this is the paper's foreground-confidence BCE.
* ``loss_mask`` / ``loss_dice``: for matched targets only, on ``num_points`` points per mask
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
layer's matched masks), so the number of operators does not grow with batch x layers. The
targets come in fixed shapes (``LocalizationTargets``: T slots per image, empty ones weighted
0), so with one target class the whole loss has the same shapes in every step and compiles
into one graph (``SOLVER.COMPILE.MODULES ["criterion"]``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import point_sample
from detectron2.utils.comm import get_world_size

from .matcher import HungarianMatcher
from .precision import float32_region


def _uncertainty(logits):
    """Points with logits near 0 are the most uncertain."""
    return -logits.abs()


def _distributed_mean_count(present):
    """Number of targets averaged over workers (at least 1), so every worker normalizes the same
    way: a 0-dim float tensor on the targets' device, never read on the host."""
    count = present.sum().float()
    world = get_world_size()
    if world > 1:
        torch.distributed.all_reduce(count)
        count = count / world
    return count.clamp(min=1.0)


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

    def _class_losses(self, layers, targets, matched):
        """(L,) class losses. logits of each layer (B, Q, K); a query matched to a present slot
        has the one-hot of the slot's class as its row, the other rows are all zeros with weight
        ``no_object_weight``. ``matched``: (L, B, T) query of each slot."""
        logits = torch.stack([layer["pred_logits"].float() for layer in layers])  # (L, B, Q, K)
        queries, classes = logits.shape[-2:]
        # (L, B, T, Q): 1 where the query is matched to a present slot.
        chosen = F.one_hot(matched, queries).to(logits.dtype) * targets.present[None, :, :, None].to(logits.dtype)
        slot_classes = F.one_hot(targets.labels, classes).to(logits.dtype)  # (B, T, K)
        target = torch.einsum("lbtq,btk->lbqk", chosen, slot_classes)
        is_matched = chosen.sum(2, keepdim=True).transpose(2, 3)  # (L, B, Q, 1), 0 or 1
        weight = (self.no_object_weight + (1.0 - self.no_object_weight) * is_matched).expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (bce * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3))

    def _mask_losses(self, layers, targets, matched, num_masks):
        """(L,) mask BCE and (L,) Dice losses over every layer's matched slots, in one pass;
        empty slots are computed too (fixed shapes) and weighted 0."""
        num_layers = len(layers)
        batch, slots = targets.present.shape
        if slots == 0:
            # Keeps every mask parameter in the graph (DDP) while contributing zero.
            zero = torch.stack([layer["pred_masks"].sum().float() * 0.0 for layer in layers])
            return zero, zero
        height, width = layers[0]["pred_masks"].shape[-2:]
        # Only the matched masks are taken and cast to fp32: (L*B*T, 1, h, w). Indexing, not
        # gather: gather's backward keeps its whole input (every query's mask of every layer).
        images = torch.arange(batch, device=matched.device)[:, None]
        src = torch.stack([layer["pred_masks"][images, query] for layer, query in zip(layers, matched)])
        src = src.float().view(num_layers * batch * slots, 1, height, width)
        with torch.no_grad():
            coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio)  # (L*B*T, P, 2)
            points = coords.shape[1]
            # Each slot's mask is sampled once, at its points of all layers; each image's valid
            # map once, at the points of all its slots and layers.
            per_slot = coords.view(num_layers, batch * slots, points, 2).transpose(0, 1)
            labels = point_sample(targets.masks.flatten(0, 1)[:, None].float(), per_slot.reshape(batch * slots, -1, 2),
                                  align_corners=False, mode="nearest")
            labels = labels.view(batch * slots, num_layers, points).transpose(0, 1).reshape(-1, points)
            per_image = coords.view(num_layers, batch, slots * points, 2).transpose(0, 1)
            weights = point_sample(targets.valid[:, None].float(), per_image.reshape(batch, -1, 2),
                                   align_corners=False, mode="nearest")
            weights = weights.view(batch, num_layers, slots * points).transpose(0, 1).reshape(-1, points)
            keep = targets.present.flatten().to(src.dtype).repeat(num_layers)  # (L*B*T,)
        point_logits = point_sample(src, coords, align_corners=False).squeeze(1)  # (L*B*T, P)

        bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none")
        per_mask_bce = (bce * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        probs = point_logits.sigmoid() * weights
        numerator = 2 * (probs * labels).sum(1)
        denominator = probs.sum(1) + (labels * weights).sum(1)
        per_mask_dice = 1 - (numerator + 1) / (denominator + 1)
        loss_mask = (per_mask_bce * keep).view(num_layers, -1).sum(1) / num_masks
        loss_dice = (per_mask_dice * keep).view(num_layers, -1).sum(1) / num_masks
        return loss_mask, loss_dice

    def forward(self, outputs, targets):
        """
        Args:
            outputs: transformer decoder output dict (``pred_logits``, ``pred_masks``, ``aux_outputs``).
            targets: ``LocalizationTargets`` at the padded input resolution.
        """
        with float32_region(outputs["pred_logits"].device.type):
            layers = [outputs]
            suffixes = [""]
            if self.deep_supervision:
                layers += list(outputs["aux_outputs"])
                suffixes += [f"_{index}" for index in range(len(outputs["aux_outputs"]))]
            num_masks = _distributed_mean_count(targets.present)
            matched = torch.stack(self.matcher.match_layers(layers, targets))  # (L, B, T)
            loss_cls = self._class_losses(layers, targets, matched)
            loss_mask, loss_dice = self._mask_losses(layers, targets, matched, num_masks)
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
