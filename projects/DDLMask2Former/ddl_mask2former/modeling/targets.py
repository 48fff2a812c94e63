"""A batch's localization targets in fixed shapes.

Every image has the same number T of target slots; a slot holds a mask and a class or is empty
(``present`` False). The model fills slot k with the mask of class k of
``MODEL.DDL.TARGET_CLASSES`` (so T = K), present when the class has a pixel in the image.

Fixed shapes are what let the matcher and the losses run as one compiled graph: with one
tensor per image and a varying number of targets, ``torch.compile`` specialized on each batch's
arrangement of real and fake images and compiled again for every new one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["LocalizationTargets"]


class LocalizationTargets(NamedTuple):
    masks: torch.Tensor  # (B, T, H, W) bool; all False in an empty slot
    labels: torch.Tensor  # (B, T) int64 class index of each slot
    present: torch.Tensor  # (B, T) bool: the slot holds a target
    valid: torch.Tensor  # (B, H, W) bool: pixels that count (False = padding or ignore)

    @classmethod
    def from_images(cls, targets):
        """From per-image dicts {"masks": (T_b, H, W), "labels": (T_b,), "valid": (H, W)}: image b's
        targets fill its first T_b slots, in order; T = the largest T_b."""
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
            if tuple(target["masks"].shape[-2:]) != (height, width):
                raise ValueError(f"localization targets: image {index}'s masks are {tuple(target['masks'].shape)}, "
                                 f"its valid map {(height, width)}")
            masks[index, :count] = target["masks"].bool()
            labels[index, :count] = target["labels"]
            present[index, :count] = True
        return cls(masks, labels, present, valid)

    def per_image(self):
        """Per-image dicts of the present slots (reads ``present`` on the host: for inspection)."""
        images = []
        for masks, labels, present, valid in zip(self.masks, self.labels, self.present.cpu(), self.valid):
            keep = present.nonzero().flatten().to(masks.device)
            images.append({"masks": masks[keep], "labels": labels[keep], "valid": valid})
        return images
