#!/usr/bin/env python
"""Convert ImageNet-1k backbone weights into a file ``MODEL.WEIGHTS`` loads.

Accepted inputs (the format is detected from the parameter names):
  * the official Swin Transformer release (``swin_tiny_patch4_window7_224.pth``, ...:
    a dict with "model"; patch merging stored at the END of each stage),
  * timm's Swin checkpoints (``.pth``/``.bin`` or ``.safetensors``; patch merging at the START
    of each stage),
  * torchvision's ResNet-50 (``resnet50-*.pth``).

The output is ``{"model": {"backbone.<name>": tensor}}`` using this project's names
(``backbone.trunk.*`` for Swin, detectron2's ``backbone.res2...``/``backbone.stem`` for ResNet).
The Swin architecture (width, depths, heads, window) is read off the checkpoint; the converted
weights are then loaded into that backbone and missing/unexpected keys are reported (the
per-stage output LayerNorms of the Swin wrapper are new, so they are always listed missing).

Usage:
  python tools/convert_pretrained.py swin_tiny_patch4_window7_224.pth pretrained/swin_tiny_patch4_window7_224_d2.pth
  python tools/convert_pretrained.py resnet50-0676ba61.pth pretrained/R-50_torchvision_d2.pth
"""
import argparse
import importlib.util
import os
import re
import sys
from collections import OrderedDict

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")

import torch


class ConversionError(RuntimeError):
    """Input checkpoint that cannot be converted; the message names the file."""


def load_checkpoint(path):
    """Read a checkpoint file into a flat name -> tensor dict."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for corrupt or foreign files
            raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint ({error})") from error
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path}: no parameter dict found")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_format(state, path):
    if "layer1.0.conv1.weight" in state and "conv1.weight" in state:
        return "torchvision_resnet"
    if "patch_embed.proj.weight" in state and any(k.startswith("layers.") for k in state):
        return "swin_official" if "layers.0.downsample.reduction.weight" in state else "swin_timm"
    sample = ", ".join(list(state)[:5])
    raise ConversionError(
        f"{path}: not an official Swin, timm Swin or torchvision ResNet checkpoint (first keys: {sample})"
    )


def swin_architecture(state, path):
    """Read embed dim, depths, heads, window and patch size off Swin parameter shapes."""
    embed_dim, _, patch_size, _ = state["patch_embed.proj.weight"].shape
    depths, num_heads = [], []
    stage = 0
    while any(k.startswith(f"layers.{stage}.blocks.") for k in state):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layers\.{stage}\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1)
        table = state.get(f"layers.{stage}.blocks.0.attn.relative_position_bias_table")
        if table is None:
            raise ConversionError(f"{path}: stage {stage} has no relative_position_bias_table")
        num_heads.append(table.shape[1])
        stage += 1
    if not depths:
        raise ConversionError(f"{path}: no Swin blocks found")
    table_size = state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (round(table_size**0.5) + 1) // 2
    if (2 * window - 1) ** 2 != table_size:
        raise ConversionError(f"{path}: relative-position table of {table_size} rows is not a square window")
    return {
        "embed_dim": int(embed_dim),
        "depths": tuple(depths),
        "num_heads": tuple(num_heads),
        "window_size": window,
        "patch_size": int(patch_size),
    }


def convert_swin(state, path):
    """Returns (converted dict with backbone.* names, backbone module, dropped source keys)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    from ddl_mask2former.modeling.backbone.swin import D2SwinTransformer

    arch = swin_architecture(state, path)
    backbone = D2SwinTransformer(**arch, drop_path_rate=0.0)
    # timm's own filter: moves patch merging to timm's layout, drops non-persistent buffers.
    filtered = checkpoint_filter_fn(dict(state), backbone.trunk)
    trunk_keys = set(backbone.trunk.state_dict())
    converted, dropped = OrderedDict(), []
    for name, tensor in filtered.items():
        if name in trunk_keys:
            converted[f"trunk.{name}"] = tensor
        else:
            dropped.append(name)  # classifier head and final norm: unused by the dense backbone
    return converted, backbone, dropped, arch


def convert_torchvision_resnet(state, path):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    depth_by_blocks = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
    blocks = tuple(
        max(int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))) + 1 for i in range(1, 5)
    )
    if blocks not in depth_by_blocks:
        raise ConversionError(f"{path}: ResNet with blocks {blocks} is not a bottleneck ResNet-50/101/152")
    converted, dropped = OrderedDict(), []
    for name, tensor in state.items():
        new = name
        if name.endswith("num_batches_tracked"):
            continue  # a BatchNorm step counter, not a weight; FrozenBN has none
        if name.startswith("fc."):
            dropped.append(name)
            continue
        new = re.sub(r"^conv1\.", "stem.conv1.", new)
        new = re.sub(r"^bn1\.", "stem.conv1.norm.", new)
        new = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", new)
        new = re.sub(r"\.bn(\d)\.", lambda m: f".conv{m.group(1)}.norm.", new)
        new = new.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        converted[new] = tensor
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth_by_blocks[blocks]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision puts the stride in the 3x3 conv
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    return converted, backbone, dropped, {"depth": depth_by_blocks[blocks]}


def convert(input_path):
    """Convert one checkpoint; returns (model dict with backbone.* names, report dict)."""
    state = load_checkpoint(input_path)
    fmt = detect_format(state, input_path)
    if fmt == "torchvision_resnet":
        converted, backbone, dropped, arch = convert_torchvision_resnet(state, input_path)
    else:
        converted, backbone, dropped, arch = convert_swin(state, input_path)
    incompatible = backbone.load_state_dict(converted, strict=False)
    for name, tensor in converted.items():
        expected = backbone.state_dict()[name].shape if name in backbone.state_dict() else None
        if expected is not None and expected != tensor.shape:
            raise ConversionError(f"{input_path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
    report = {
        "format": fmt,
        "architecture": arch,
        "converted": len(converted),
        "dropped_from_input": dropped,
        "missing_in_backbone": list(incompatible.missing_keys),
        "unexpected_in_backbone": list(incompatible.unexpected_keys),
    }
    return OrderedDict((f"backbone.{k}", v) for k, v in converted.items()), report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official Swin / timm Swin / torchvision ResNet checkpoint")
    parser.add_argument("output", help="where to write the converted .pth (for MODEL.WEIGHTS)")
    args = parser.parse_args(argv)
    try:
        model, report = convert(args.input)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": model, "__author__": "ddl_mask2former.convert_pretrained", "matching_heuristics": False},
               args.output)
    print(f"input {args.input}: {report['format']} {report['architecture']}")
    print(f"converted {report['converted']} tensors; dropped from input (unused by the backbone): "
          f"{report['dropped_from_input'] or 'none'}")
    print(f"missing in backbone (stay at their initialization): {report['missing_in_backbone'] or 'none'}")
    print(f"unexpected in backbone: {report['unexpected_in_backbone'] or 'none'}")
    print(f"wrote {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
