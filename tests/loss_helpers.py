"""Per-image views of the batched matcher and targets, for tests that compare against
references written one image at a time (the package works on ``LocalizationTargets`` only)."""
import torch

from ddl_mask2former.modeling.matcher import batched_mask_costs
from ddl_mask2former.modeling.targets import LocalizationTargets


def targets_from_images(targets):
    """``LocalizationTargets`` from per-image dicts {"masks": (T_b, H, W), "labels": (T_b,),
    "valid": (H, W)}: image b's targets fill its first T_b slots, in order; T = the largest T_b."""
    if not targets:
        raise ValueError("localization targets: the batch is empty")
    valid = torch.stack([t["valid"] for t in targets])
    batch, (height, width) = len(targets), valid.shape[-2:]
    slots = max(int(t["masks"].shape[0]) for t in targets)
    masks = valid.new_zeros((batch, slots, height, width), dtype=torch.bool)
    labels = torch.zeros(batch, slots, dtype=torch.int64, device=valid.device)
    present = torch.zeros(batch, slots, dtype=torch.bool, device=valid.device)
    for index, target in enumerate(targets):
        count = int(target["masks"].shape[0])
        masks[index, :count] = target["masks"].bool()
        labels[index, :count] = target["labels"]
        present[index, :count] = True
    return LocalizationTargets(masks, labels, present, valid)


def targets_per_image(targets):
    """Per-image dicts of the present slots of a ``LocalizationTargets``."""
    images = []
    for masks, labels, present, valid in zip(targets.masks, targets.labels, targets.present.cpu(), targets.valid):
        keep = present.nonzero().flatten().to(masks.device)
        images.append({"masks": masks[keep], "labels": labels[keep], "valid": valid})
    return images


def pairwise_mask_costs(mask_logits, targets, weights):
    """(bce, dice), both (Q, T), of one image: mask_logits (Q, P), targets (T, P), weights (P,)."""
    bce, dice = batched_mask_costs(mask_logits[None], targets[None], weights[None])
    return bce[0], dice[0]


def cost_matrix(matcher, logits, mask_logits, target_masks, target_labels, valid):
    """(Q, T) matching cost of one image: logits (Q, K), mask_logits (Q, h, w), target_masks
    (T, H, W), target_labels (T,), valid (H, W)."""
    present = torch.ones(1, target_masks.shape[0], dtype=torch.bool, device=target_masks.device)
    targets = LocalizationTargets(target_masks[None], target_labels[None], present, valid[None])
    return matcher.batched_costs(logits[None], mask_logits[None], targets)[0]


def match_per_image(matcher, outputs, targets):
    """Per image, (query_indices, target_indices) for one prediction {"pred_logits",
    "pred_masks"} and per-image target dicts."""
    matched = matcher.match_layers([outputs], targets_from_images(targets))[0]
    return [(matched[b, :int(t["masks"].shape[0])], torch.arange(int(t["masks"].shape[0]), device=matched.device))
            for b, t in enumerate(targets)]
