"""Backbones: Swin (timm) registered here; ResNet is detectron2's ``build_resnet_backbone``."""
from .swin import D2SwinTransformer, build_swin_backbone

__all__ = ["D2SwinTransformer", "build_swin_backbone"]
