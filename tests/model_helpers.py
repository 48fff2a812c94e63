"""Tiny DDLMask2Former configs and inputs for the model tests (CPU, a fraction of a second each)."""
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

# Importing the package registers the meta-architecture and backbone.
from ddl_mask2former import add_ddl_mask2former_config


def ddl_cfg(**overrides):
    """detectron2's defaults plus this project's keys, with dotted overrides:
    ``ddl_cfg(**{"SOLVER.AMP.PRECISION": "bfloat16"})``."""
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


def tiny_cfg(backbone="swin", tasks=("detection", "localization")):
    """A DDLMask2Former config with every size knob turned down; ``backbone``: swin, r18 or r50."""
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DDLMask2Former"
    cfg.MODEL.DEVICE = "cpu"
    if backbone == "swin":
        cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
        swin = cfg.MODEL.SWIN
        swin.EMBED_DIM, swin.DEPTHS, swin.NUM_HEADS = 16, [1, 1, 1, 1], [1, 1, 2, 2]
        swin.WINDOW_SIZE, swin.MLP_RATIO, swin.DROP_PATH_RATE = 4, 2.0, 0.0
    elif backbone in ("r18", "r50"):
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        resnets = cfg.MODEL.RESNETS
        resnets.DEPTH = 18 if backbone == "r18" else 50
        resnets.NORM = "BN" if backbone == "r18" else "FrozenBN"
        resnets.STEM_OUT_CHANNELS = 16 if backbone == "r18" else 64
        resnets.RES2_OUT_CHANNELS = 64 if backbone == "r18" else 256
        resnets.STRIDE_IN_1X1 = False
        resnets.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    else:
        raise ValueError(f"unknown test backbone {backbone}")
    ddl = cfg.MODEL.DDL
    ddl.TASKS = list(tasks)
    pd = ddl.PIXEL_DECODER
    pd.CONV_DIM, pd.MASK_DIM, pd.ENCODER_LAYERS, pd.ENCODER_HEADS, pd.ENCODER_POINTS, pd.ENCODER_FFN_DIM = (
        32, 32, 1, 2, 2, 64)
    td = ddl.TRANSFORMER_DECODER
    td.HIDDEN_DIM, td.NUM_QUERIES, td.NHEADS, td.DIM_FEEDFORWARD, td.DEC_LAYERS = 32, 4, 2, 64, 3
    ddl.LOSS.NUM_POINTS = 256
    # The network's own outputs (the head's probability, the map as it comes), so tests of the
    # network compare what it computed; tests/test_verdict.py covers the other rules and the gate.
    ddl.VERDICT.RULE = "head"
    ddl.VERDICT.MASK_POLICY = "independent"
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def square_mask(height, width, top, left, size):
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[top: top + size, left: left + size] = 1
    return mask


def training_batch(height=64, width=64, seed=0):
    """One real and one fake image (a bright square that is also the forged region)."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.randint(60, 120, (3, height, width), dtype=torch.uint8, generator=generator)
    fake = torch.randint(60, 120, (3, height, width), dtype=torch.uint8, generator=generator)
    forgery = square_mask(height, width, height // 4, width // 4, height // 2)
    fake[:, forgery.bool()] = 230
    return [
        {"image": real, "label": 0, "forgery_mask": torch.zeros(height, width, dtype=torch.uint8),
         "file_name": "real.png", "image_id": "real", "height": height, "width": width},
        {"image": fake, "label": 1, "forgery_mask": forgery,
         "file_name": "fake.png", "image_id": "fake", "height": height, "width": width},
    ]


def eval_inputs(batch, height=None, width=None):
    """Test-mapper style dicts (no targets) for the images of ``batch``."""
    return [
        {"image": record["image"], "height": height or record["height"], "width": width or record["width"],
         "file_name": record["file_name"], "image_id": record["image_id"]}
        for record in batch
    ]


def saved_bytes(function, exclude=()):
    """``function()`` and the bytes of distinct storages autograd keeps for its backward, less
    those of the tensors in ``exclude`` (e.g. parameters, which exist anyway)."""
    sizes = {}
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            sizes[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function()
    return output, sum(sizes.values())


def assert_same_step(reference, function, x, modules, amp):
    """Run ``reference(inputs)`` and ``function(inputs)`` (float32, or under bf16 autocast), each
    with a backward; assert equal outputs (dtype included) and gradients of the inputs and of
    the modules' parameters (float32). Bit-equal on the development machine; one bf16 rounding
    step of room for other kernels. Returns both saved-byte counts, parameters excluded."""
    parameters = [p for module in modules for p in module.parameters()]
    runs = []
    for run_function in (reference, function):
        for parameter in parameters:
            parameter.grad = None
        inputs = x.clone().requires_grad_(True)

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                return run_function(inputs)
        output, saved = saved_bytes(run, exclude=parameters)
        output.float().square().sum().backward()
        runs.append((output, saved, inputs.grad, [p.grad.clone() for p in parameters]))
    (expected, expected_saved, expected_grad, expected_params), (output, saved, grad, params) = runs
    assert output.dtype == expected.dtype == (torch.bfloat16 if amp else torch.float32)
    tolerance = dict(rtol=4e-3, atol=1e-6) if amp else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(output, expected, **tolerance)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, expected_grad, **tolerance)
    for actual, wanted in zip(params, expected_params):
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual, wanted, **tolerance)
    return expected_saved, saved
