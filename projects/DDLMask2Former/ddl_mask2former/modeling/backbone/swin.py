"""Swin Transformer (timm) as a detectron2 ``Backbone`` with outputs res2..res5.

The trunk is ``timm.models.swin_transformer.SwinTransformer`` built with
``strict_img_size=False, always_partition=True``: any input whose sides are multiples of
``patch_size * 2**(num_stages - 1)`` (32 for Swin-T/S) works, every stage uses the configured
window and shift, and the outputs equal a Swin built natively for that input size (timm pads
feature maps to whole windows internally). timm returns NHWC maps; this wrapper applies one
LayerNorm per output stage (as Swin's detection/segmentation heads do) and returns NCHW.

Shifted-window masks: timm (like the official Swin) adds -100 to attention logits between
tokens of different shifted regions. exp(-100) ~ 4e-44 is a float32 denormal, and denormals make
CPU matrix products several times slower (the Swin-T backbone at 512 px spent ~1/3 of its CPU
time on them). The wrapper turns those -100 entries into -inf, which is what they stand for:
the masked weights become exact zeros (no row is ever fully masked: a token always sees its
own region), and the outputs match timm's to float32 rounding.

Opt-in memory options (off until measured on a GPU; modeling/README.md "Defaults and the GPU"):

MLPs: each block's ``fc1 -> GELU -> fc2`` keeps only the GELU's input for the backward and
recomputes the activation there (``gelu_linear.py``, ``MODEL.SWIN.RECOMPUTE_GELU``): the same
gradients for about half of the MLPs' saved activations, the largest ones Swin keeps.

Attention: each block's written-out window attention keeps q, k and v for the backward and
recomputes the attention probabilities there (``window_attention.py``,
``MODEL.SWIN.RECOMPUTE_ATTENTION``): the same gradients, without the float32 probabilities and
their low-precision copy, the other large activations of a block.

Parameter names: ``trunk.*`` are timm's own names, so timm checkpoints load after a prefix
change (``tools/convert_pretrained.py`` also converts the official Swin release).
"""
import types

import timm
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from torch import nn

from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

from ..shape_cache import ShapeCache
from .gelu_linear import recompute_gelu_in_backward
from .window_attention import recompute_attention_in_backward

_STAGE_NAMES = ("res2", "res3", "res4", "res5")


class D2SwinTransformer(Backbone):
    """Swin trunk returning a dict ``{"res2": (B,C,H/4,W/4), ..., "res5": (B,8C,H/32,W/32)}``."""

    def __init__(
        self,
        *,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        patch_size=4,
        mlp_ratio=4.0,
        drop_path_rate=0.3,
        out_features=_STAGE_NAMES,
        out_norm=True,
        in_chans=3,
        fused_attention=False,
        recompute_gelu=False,
        recompute_attention=False,
        grad_checkpointing=False,
    ):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or len(depths) > len(_STAGE_NAMES):
            raise ValueError(
                f"Swin depths {depths} and num_heads {num_heads} must have the same length (<= 4)"
            )
        unknown = [f for f in out_features if f not in _STAGE_NAMES[: len(depths)]]
        if unknown:
            raise ValueError(f"Swin out_features {unknown} not in {_STAGE_NAMES[:len(depths)]}")
        # The variant name only picks timm's builder; every architecture argument is explicit.
        self.trunk = timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            num_classes=0,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            patch_size=patch_size,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            strict_img_size=False,
            always_partition=True,
        )
        for module in self.trunk.modules():
            if isinstance(module, SwinTransformerBlock):
                _use_exact_window_masks(module)
                if recompute_gelu and not recompute_gelu_in_backward(module.mlp):
                    raise ValueError(f"Swin MLP {type(module.mlp).__name__} is not fc1 -> exact GELU -> fc2; "
                                     "set MODEL.SWIN.RECOMPUTE_GELU False")
            if isinstance(module, WindowAttention):
                # timm's switch: F.scaled_dot_product_attention with the position bias (and the
                # shift mask) as attn_mask, instead of softmax(q k^T + bias) v written out, whose
                # backward keeps the float32 attention probabilities (MODEL.SWIN.FUSED_ATTENTION).
                module.fused_attn = fused_attention
                if recompute_attention and not recompute_attention_in_backward(module):
                    raise ValueError(f"Swin attention {type(module).__name__} is not timm's written-out window "
                                     "attention; set MODEL.SWIN.RECOMPUTE_ATTENTION False")
        # Activation checkpointing of whole blocks (timm's switch): each block keeps only its input
        # and runs its forward again in the backward (MODEL.SWIN.GRAD_CHECKPOINTING).
        self.trunk.set_grad_checkpointing(grad_checkpointing)
        stage_indices = [_STAGE_NAMES.index(f) for f in out_features]
        self.trunk.prune_intermediate_layers(max(stage_indices) + 1, prune_norm=True, prune_head=True)
        self._out_features = list(out_features)
        self._stage_of = {name: _STAGE_NAMES.index(name) for name in out_features}
        channels = [int(embed_dim * 2**i) for i in range(len(depths))]
        self._out_feature_channels = {n: channels[i] for n, i in self._stage_of.items()}
        self._out_feature_strides = {n: patch_size * 2**i for n, i in self._stage_of.items()}
        self.out_norms = nn.ModuleDict(
            {n: (nn.LayerNorm(self._out_feature_channels[n]) if out_norm else nn.Identity()) for n in out_features}
        )
        self._size_divisibility = patch_size * 2 ** (len(depths) - 1)

    @property
    def size_divisibility(self):
        return self._size_divisibility

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"Swin backbone expects (B,C,H,W) input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self._size_divisibility or w % self._size_divisibility:
            raise ValueError(
                f"Swin backbone input {h}x{w} must be a multiple of {self._size_divisibility} on both sides"
            )
        outputs = {}
        last = max(self._stage_of.values())
        y = self.trunk.patch_embed(x)
        for index, stage in enumerate(self.trunk.layers):
            y = stage(y)
            for name, stage_index in self._stage_of.items():
                if stage_index == index:
                    outputs[name] = self.out_norms[name](y).permute(0, 3, 1, 2).contiguous()
            if index == last:
                break
        return outputs

    def output_shape(self):
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }


def _use_exact_window_masks(block):
    """Make ``block.get_attn_mask`` return -inf (not -100) for forbidden token pairs, cached.

    timm builds the shifted-window mask on every forward when the input size is not fixed
    (about 50 small operations per shifted block: a zero map, nine region fills, the window
    partition and two ``masked_fill``). The mask depends only on the padded feature size, the
    device and the dtype, so each block keeps it per key, like the position encodings.
    """
    original = block.get_attn_mask
    cache = ShapeCache()

    def exact(mask):
        return None if mask is None else mask.masked_fill(mask < 0, float("-inf"))

    def get_attn_mask(self, x=None, device=None, dtype=None):
        if x is None:  # the fixed-size buffer, built once
            return exact(original(x, device=device, dtype=dtype))
        key = (x.shape[1], x.shape[2], x.device, x.dtype, tuple(self.window_size), tuple(self.shift_size))
        return cache.get(key, lambda: exact(original(x)))

    block.get_attn_mask = types.MethodType(get_attn_mask, block)
    if getattr(block, "attn_mask", None) is not None:  # blocks built for a fixed size cache the mask
        block.attn_mask = block.get_attn_mask(device=block.attn_mask.device, dtype=block.attn_mask.dtype)


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape):
    """detectron2 backbone builder reading ``cfg.MODEL.SWIN``."""
    swin = cfg.MODEL.SWIN
    return D2SwinTransformer(
        embed_dim=swin.EMBED_DIM,
        depths=swin.DEPTHS,
        num_heads=swin.NUM_HEADS,
        window_size=swin.WINDOW_SIZE,
        patch_size=swin.PATCH_SIZE,
        mlp_ratio=swin.MLP_RATIO,
        drop_path_rate=swin.DROP_PATH_RATE,
        out_features=swin.OUT_FEATURES,
        out_norm=swin.OUT_NORM,
        in_chans=input_shape.channels,
        fused_attention=swin.FUSED_ATTENTION,
        recompute_gelu=swin.RECOMPUTE_GELU,
        recompute_attention=swin.RECOMPUTE_ATTENTION,
        grad_checkpointing=swin.GRAD_CHECKPOINTING,
    )


__all__ = ["D2SwinTransformer", "build_swin_backbone"]
