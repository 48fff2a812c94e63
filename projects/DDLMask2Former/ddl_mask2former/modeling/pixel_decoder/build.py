"""Registry of pixel decoders.

Interface: ``cls(cfg, input_shape)`` (a ``@configurable`` constructor; ``input_shape`` maps
backbone feature names to ``ShapeSpec``) and ``forward(features) -> (mask_features,
multi_scale_features)`` where ``mask_features`` is (B, mask_dim, H/4, W/4), the per-pixel
embeddings P, and ``multi_scale_features`` is a list of (B, conv_dim, h, w) maps, lowest
resolution first, for the transformer decoder. Instances expose ``conv_dim`` and ``mask_dim``.
"""
from detectron2.utils.registry import Registry

PIXEL_DECODER_REGISTRY = Registry("DDL_PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = __doc__


def build_pixel_decoder(cfg, input_shape):
    """Build ``cfg.MODEL.DDL.PIXEL_DECODER.NAME`` over the backbone's ``input_shape``."""
    name = cfg.MODEL.DDL.PIXEL_DECODER.NAME
    return PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
