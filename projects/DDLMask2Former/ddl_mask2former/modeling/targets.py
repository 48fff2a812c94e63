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
