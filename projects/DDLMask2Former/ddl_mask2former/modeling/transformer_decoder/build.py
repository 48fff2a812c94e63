"""Registry of transformer decoders.

Interface: ``cls(cfg, in_channels, mask_dim)`` (a ``@configurable`` constructor) and
``forward(multi_scale_features, mask_features, all_masks=True) -> dict`` with
``pred_logits`` (B, N, K) confidence logits, one per localization class
(``MODEL.DDL.TARGET_CLASSES``, K = 1 or 2), ``pred_masks`` (B, N, H/4, W/4) mask
logits of the last layer, and ``aux_outputs``: a list of the same two keys for every earlier
prediction (deep supervision; empty when ``all_masks`` is False, as at inference).
"""
from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("DDL_TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = __doc__


def build_transformer_decoder(cfg, in_channels, mask_dim):
    """Build ``cfg.MODEL.DDL.TRANSFORMER_DECODER.NAME``."""
    name = cfg.MODEL.DDL.TRANSFORMER_DECODER.NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_dim)
