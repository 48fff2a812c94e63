"""Transformer decoders (pluggable through ``TRANSFORMER_DECODER_REGISTRY``)."""
from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .masked_attention import MaskedAttentionDecoder

__all__ = ["TRANSFORMER_DECODER_REGISTRY", "build_transformer_decoder", "MaskedAttentionDecoder"]
