"""What several benchmarks share: the repository's config paths and model shapes, the models
(ours from a config, Hugging Face's Mask2Former of the same shape) and their inputs, autograd's
saved tensors by submodule, interleaved CPU timing with its ratio table, the installed-package
check and the ``--json`` tail."""
import collections
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PAPER_CONFIG = ROOT / "configs" / "ddl-i" / "ddl_mask2former_swin_tiny.yaml"
QUICKSTART_CONFIG = ROOT / "configs" / "quickstart" / "ddl_mask2former_quickstart_swin.yaml"
TINY_CONFIG = ROOT / "tests" / "configs" / "tiny.yaml"

# Model shapes shared by ours and HF's; "small" has tests/configs/tiny.yaml's widths but the paper's
# 9 decoder layers, so the per-step count of operators and host syncs has the paper model's structure.
SHAPES = {
    "full": {"image": 512, "embed_dim": 96, "depths": [2, 2, 6, 2], "heads": [3, 6, 12, 24], "window": 7,
             "dim": 256, "enc_layers": 6, "enc_heads": 8, "enc_ffn": 1024, "queries": 100, "dec_layers": 9,
             "dec_heads": 8, "dec_ffn": 2048, "points": 12544},
    "small": {"image": 64, "embed_dim": 16, "depths": [1, 1, 1, 1], "heads": [1, 1, 2, 2], "window": 4,
              "dim": 32, "enc_layers": 1, "enc_heads": 2, "enc_ffn": 64, "queries": 16, "dec_layers": 9,
              "dec_heads": 2, "dec_ffn": 64, "points": 256},
}


def autocast(device, dtype):
    """The project's autocast region (``modeling/precision.py``) on ``device``; None: full precision."""
    from ddl_mask2former.modeling.precision import autocast_region

    return autocast_region(device.type, dtype)


# ----------------------------------------------------------------------------- models and inputs

def ddl_records(batch, size, seed=0, image_size=None):
    """What DDLDatasetMapper yields: uint8 CHW images on the CPU, half of them fake with a mask."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for index in range(batch):
        mask = torch.zeros(size, size, dtype=torch.uint8)
        label = index % 2
        if label:
            top, left = (int(v) for v in torch.randint(0, size // 2, (2,), generator=generator))
            mask[top: top + size // 3, left: left + size // 3] = 1
        records.append({"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator),
                        "label": label, "forgery_mask": mask, "height": image_size or size,
                        "width": image_size or size})
    return records


def hf_batch(records, device):
    pixel_values = torch.stack([r["image"] for r in records]).float().div_(255.0).to(device)
    mask_labels, class_labels = [], []
    for record in records:
        if record["label"]:
            mask_labels.append(record["forgery_mask"][None].float().to(device))
            class_labels.append(torch.zeros(1, dtype=torch.long, device=device))
        else:
            size = record["forgery_mask"].shape
            mask_labels.append(torch.zeros((0,) + tuple(size), device=device))
            class_labels.append(torch.zeros(0, dtype=torch.long, device=device))
    return pixel_values, mask_labels, class_labels


def build_ours(config_file, device, shape_name, overrides=()):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import ddl_mask2former
    from ddl_mask2former.config import add_ddl_mask2former_config

    ddl_mask2former.register_all()
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file(str(config_file))
    if shape_name == "small" and config_file == PAPER_CONFIG:
        cfg.merge_from_file(str(TINY_CONFIG))
        cfg.MODEL.DDL.TRANSFORMER_DECODER.DEC_LAYERS = SHAPES["small"]["dec_layers"]
        cfg.MODEL.DDL.TRANSFORMER_DECODER.NUM_QUERIES = SHAPES["small"]["queries"]
    cfg.merge_from_list(list(overrides))
    cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "", str(device)
    torch.manual_seed(0)
    return build_model(cfg), cfg


def build_hf(shape, device):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(
        embed_dim=shape["embed_dim"], depths=shape["depths"], num_heads=shape["heads"],
        window_size=shape["window"], drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone, num_queries=shape["queries"], decoder_layers=shape["dec_layers"] + 1,
        num_labels=1, feature_size=shape["dim"], mask_feature_size=shape["dim"], hidden_dim=shape["dim"],
        encoder_layers=shape["enc_layers"], num_attention_heads=shape["dec_heads"],
        dim_feedforward=shape["dec_ffn"], encoder_feedforward_dim=shape["enc_ffn"],
        train_num_points=shape["points"],
    )
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(config).to(device)


def saved_tensor_mib(model, records, device, amp_dtype, depth=1):
    """MiB of distinct storages autograd keeps for the backward of one training forward (a
    device-independent proxy for the activation memory; weights saved by their layers included),
    in all and by the innermost submodule, down to ``depth`` name parts, whose forward saved it
    first (list indices merged: "pixel_decoder.encoder.*"; "rest": inputs, targets and the
    criterion outside a submodule). On the CPU the deformable attention runs its PyTorch path,
    which keeps more than the compiled op does on a GPU (``MODEL.DDL.PIXEL_DECODER.REGISTERED_OP``
    keeps what it keeps)."""
    sizes, owner, current = {}, {}, ["rest"]

    def pack(tensor):
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        owner.setdefault(storage.data_ptr(), current[-1])
        return tensor

    def enter(name):
        return lambda module, inputs: current.append(name)

    def leave(module, inputs, output):
        current.pop()
    hooks = []
    for name, child in model.named_modules():
        parts = name.split(".")
        if name and len(parts) <= depth:
            label = ".".join("*" if part.isdigit() else part for part in parts)
            hooks += [child.register_forward_pre_hook(enter(label)), child.register_forward_hook(leave)]
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with autocast(device, amp_dtype):
                losses = model(records)
    finally:
        for hook in hooks:
            hook.remove()
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    by_module = collections.Counter()
    for pointer, size in sizes.items():
        by_module[owner[pointer]] += size / 2**20
    return sum(sizes.values()) / 2**20, dict(by_module.most_common())


def require_package():
    """Stop with a one-line message when ``ddl_mask2former`` is not installed."""
    if importlib.util.find_spec("ddl_mask2former") is None:
        sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")


def add_json_argument(parser, flag="--json"):
    parser.add_argument(flag, help="also write the results to this JSON file")


def write_json(path, results):
    """Write ``results`` to ``path`` (when given) and say where they went."""
    if not path:
        return
    Path(path).write_text(json.dumps(results, indent=1, default=str))
    print(f"results written to {os.path.abspath(path)}")


# The deployment benchmarks' 1 MP case: 512 px tiles overlapping by 64 (9 tiles), one at a time.
TILE_OPTS_1MP = ["TEST.TILE.ENABLED", "True", "TEST.TILE.SIZE", "512", "TEST.TILE.OVERLAP", "64",
                 "TEST.TILE.BATCH_SIZE", "1"]


def interleaved_timing(runners, runs, warmup):
    """Run each of ``runners`` (name -> callable) in turn, ``runs`` rounds after ``warmup``;
    name -> (wall times, CPU times) in seconds."""
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    with torch.no_grad():
        for _ in range(warmup):
            for run in runners.values():
                run()
        for _ in range(runs):
            for name, run in runners.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                run()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
    return wall, cpu


def latency_report(title, wall, cpu, reference, scales=None):
    """Print the median wall and CPU time of each runner (times ``scales[name]``) and its ratio
    to ``reference``'s; return name -> {wall_s, cpu_s, wall_ratio, cpu_ratio}."""
    print(title)
    print(f"  {'runner':<26} {'wall median s':>14} {'cpu median s':>13} {'wall / ' + reference:>18} "
          f"{'cpu / ' + reference:>17}")
    rows = {}
    for name in wall:
        scale = (scales or {}).get(name, 1.0)
        rows[name] = {"wall_s": statistics.median(wall[name]) * scale,
                      "cpu_s": statistics.median(cpu[name]) * scale}
    for name, row in rows.items():
        row["wall_ratio"] = row["wall_s"] / rows[reference]["wall_s"]
        row["cpu_ratio"] = row["cpu_s"] / rows[reference]["cpu_s"]
        print(f"  {name:<26} {row['wall_s']:>14.3f} {row['cpu_s']:>13.3f} {row['wall_ratio']:>18.3f} "
              f"{row['cpu_ratio']:>17.3f}")
    return rows
