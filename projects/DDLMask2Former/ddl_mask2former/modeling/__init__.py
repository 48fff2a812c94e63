"""DDLMask2Former model. Importing this package registers the meta-architecture, the Swin
backbone and the pixel/transformer decoders with detectron2's registries."""
from .backbone import D2SwinTransformer, build_swin_backbone
from .criterion import LocalizationCriterion
from .detection_head import DetectionHead
from .matcher import HungarianMatcher
from .meta_arch import DDLMask2Former
from .pixel_decoder import PIXEL_DECODER_REGISTRY, MSDeformAttnPixelDecoder, build_pixel_decoder
from .targets import LocalizationTargets
from .transformer_decoder import TRANSFORMER_DECODER_REGISTRY, MaskedAttentionDecoder, build_transformer_decoder

__all__ = [
    "D2SwinTransformer",
    "build_swin_backbone",
    "LocalizationCriterion",
    "DetectionHead",
    "HungarianMatcher",
    "LocalizationTargets",
    "DDLMask2Former",
    "PIXEL_DECODER_REGISTRY",
    "MSDeformAttnPixelDecoder",
    "build_pixel_decoder",
    "TRANSFORMER_DECODER_REGISTRY",
    "MaskedAttentionDecoder",
    "build_transformer_decoder",
]
