"""Pixel decoders (pluggable through ``PIXEL_DECODER_REGISTRY``)."""
from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .msdeform import MSDeformAttnPixelDecoder

__all__ = ["PIXEL_DECODER_REGISTRY", "build_pixel_decoder", "MSDeformAttnPixelDecoder"]
