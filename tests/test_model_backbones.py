"""The Swin wrapper equals timm on the same weights; converted checkpoints load and match."""
import re

import pytest
import timm
import torch
import torchvision

from detectron2.checkpoint import DetectionCheckpointer

from ddl_mask2former.modeling.backbone.swin import D2SwinTransformer
from model_helpers import assert_same_step, build, saved_bytes, tiny_cfg
from tool_helpers import load_tool

pytestmark = pytest.mark.usefixtures("one_torch_thread")
convert_pretrained = load_tool("convert_pretrained")


SWIN_ARCH = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=7)


def _timm_swin(**kwargs):
    torch.manual_seed(1)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, drop_path_rate=0.0,
                             strict_img_size=False, always_partition=True, **SWIN_ARCH, **kwargs).eval()


@pytest.mark.parametrize("size", [(224, 224), (96, 160)])
def test_swin_wrapper_features_equal_timm(size):
    reference = _timm_swin(features_only=True)
    wrapper = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0, out_norm=False).eval()
    plain_names = _timm_swin().state_dict()
    # features_only flattens "layers.0" to "layers_0"; map timm's names back onto the trunk.
    state = {re.sub(r"^layers_(\d+)", r"layers.\1", k): v for k, v in reference.state_dict().items()}
    missing, unexpected = wrapper.trunk.load_state_dict(state, strict=False)
    assert not unexpected and all(k in plain_names for k in state)
    assert not [k for k in missing if "relative_position_index" not in k]
    image = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = reference(image)
        actual = wrapper(image)
    for stage, name in enumerate(("res2", "res3", "res4", "res5")):
        torch.testing.assert_close(actual[name], expected[stage].permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_fused_window_attention_equals_the_written_out_one():
    """MODEL.SWIN.FUSED_ATTENTION: same features and gradients (shifted windows and padding
    included: 96x160 is not a multiple of the window at every stage)."""
    torch.manual_seed(0)
    plain = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0)
    fused = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0, fused_attention=True)
    fused.load_state_dict(plain.state_dict())
    assert all(m.fused_attn for m in fused.modules() if hasattr(m, "fused_attn"))
    assert not any(m.fused_attn for m in plain.modules() if hasattr(m, "fused_attn"))
    image = torch.randn(2, 3, 96, 160)
    outputs = [model(image) for model in (plain, fused)]
    for name in outputs[0]:
        torch.testing.assert_close(outputs[1][name], outputs[0][name], rtol=1e-5, atol=1e-5)
    for model, output in zip((plain, fused), outputs):
        sum(value.square().mean() for value in output.values()).backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_swin_window_masks_are_cached_per_size():
    """The shifted-window masks are built once per feature size: later forwards dispatch fewer
    operators, and alternating sizes gives each size the features of a fresh model."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.calls += 1
            return func(*args, **(kwargs or {}))

    def count_ops(model, image):
        CountOps.calls = 0
        with CountOps(), torch.no_grad():
            output = model(image)
        return CountOps.calls, output

    torch.manual_seed(0)
    wrapper = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0).eval()
    small, large = torch.randn(1, 3, 96, 160), torch.randn(1, 3, 224, 224)
    first_calls, first = count_ops(wrapper, small)
    count_ops(wrapper, large)
    again_calls, again = count_ops(wrapper, small)
    assert again_calls < first_calls - 40  # mask building: ~50 operators per shifted block
    fresh = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0).eval()
    fresh.load_state_dict(wrapper.state_dict())
    with torch.no_grad():
        expected_large = fresh(large)
        _, cached_large = count_ops(wrapper, large)
    for name in first:
        assert torch.equal(again[name], first[name])
        assert torch.equal(cached_large[name], expected_large[name])


def test_swin_rejects_sizes_not_multiple_of_32():
    wrapper = D2SwinTransformer(**SWIN_ARCH)
    with pytest.raises(ValueError, match="multiple of 32"):
        wrapper(torch.zeros(1, 3, 70, 64))


def _official_swin_checkpoint(timm_state):
    """The official release's layout: patch merging at the end of stage i, 'head.' classifier."""
    official = {}
    for name, tensor in timm_state.items():
        name = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", name)
        official[name.replace("head.fc.", "head.")] = tensor
    return {"model": official}


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_convert_swin_checkpoint_loads_and_matches(tmp_path, layout):
    source = _timm_swin(num_classes=10)
    state = source.state_dict()
    checkpoint = _official_swin_checkpoint(state) if layout == "official" else state
    path = tmp_path / "swin.pth"
    torch.save(checkpoint, path)
    out = tmp_path / "converted.pth"
    assert convert_pretrained.main([str(path), str(out)]) == 0

    _, report = convert_pretrained.convert(str(path))
    assert report["format"] == f"swin_{layout}"
    assert report["architecture"]["depths"] == SWIN_ARCH["depths"]
    assert all(k.startswith("out_norms.") for k in report["missing_in_backbone"])
    assert not report["unexpected_in_backbone"]

    wrapper = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0, out_norm=False).eval()
    converted = torch.load(out, weights_only=True)["model"]
    wrapper.load_state_dict({k[len("backbone."):]: v for k, v in converted.items()}, strict=False)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, reference = source.forward_intermediates(image)
        actual = wrapper(image)
    torch.testing.assert_close(actual["res5"], reference[-1], rtol=1e-5, atol=1e-5)


def test_convert_torchvision_resnet50_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet50().eval()
    for module in source.modules():  # non-trivial BN statistics so the mapping is really checked
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path, out = tmp_path / "resnet50.pth", tmp_path / "r50_d2.pth"
    torch.save(source.state_dict(), path)
    assert convert_pretrained.main([str(path), str(out)]) == 0

    model = build(tiny_cfg("r50")).eval()
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer.load(str(out))
    assert incompatible is not None
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x = source.maxpool(source.relu(source.bn1(source.conv1(image))))
        expected = {}
        for index, layer in enumerate((source.layer1, source.layer2, source.layer3, source.layer4)):
            x = layer(x)
            expected[f"res{index + 2}"] = x
        actual = model.backbone(image)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-4)


def test_convert_rejects_unknown_checkpoint(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    assert convert_pretrained.main([str(path), str(tmp_path / "out.pth")]) == 1
    assert "other.pth" in capsys.readouterr().err


def test_swin_window_masks_leave_no_denormals():
    """Shifted-window attention must not produce float32 denormals (they slow CPU matmuls several-fold)."""
    wrapper = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0).eval()
    found = []

    def count_denormals(module, inputs, output):
        x = inputs[0]
        found.append(int(((x != 0) & (x.abs() < torch.finfo(torch.float32).tiny)).sum()))

    for name, module in wrapper.named_modules():
        if name.endswith("attn.proj"):
            module.register_forward_hook(count_denormals)
    with torch.no_grad():
        wrapper(torch.randn(1, 3, 128, 160))
    assert found and sum(found) == 0


def _swin_variant_equals_plain(plain_options, variant_options):
    """Build two Swin backbones with the same weights, run forward + backward on one image batch,
    check equal features (bit for bit) and gradients; return both saved-byte counts and the
    variant."""
    torch.manual_seed(0)
    plain = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0, **plain_options)
    variant = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0, **variant_options)
    variant.load_state_dict(plain.state_dict())
    image = torch.randn(2, 3, 96, 160)
    runs = []
    for model in (plain, variant):
        output, saved = saved_bytes(lambda model=model: model(image))
        sum(value.square().mean() for value in output.values()).backward()
        runs.append((output, saved))
    for name in runs[0][0]:
        torch.testing.assert_close(runs[1][0][name], runs[0][0][name], rtol=0, atol=0)
    for (name, a), b in zip(plain.named_parameters(), variant.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    return runs[0][1], runs[1][1], variant


@pytest.mark.parametrize("amp", [False, True])
def test_gelu_linear_equals_gelu_then_linear_and_keeps_less(amp):
    """Same output and gradients as F.linear(F.gelu(h)) (fp32, and bf16 autocast as autocast
    runs it); the GELU output is not kept for the backward."""
    from ddl_mask2former.modeling.backbone.gelu_linear import gelu_linear

    torch.manual_seed(0)
    x = torch.randn(2, 50, 16)
    fc1, fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    reference_saved, saved = assert_same_step(
        lambda inputs: fc2(torch.nn.functional.gelu(fc1(inputs))),
        lambda inputs: gelu_linear(fc1(inputs), fc2.weight, fc2.bias), x, (fc1, fc2), amp)
    hidden_bytes = 2 * 50 * 64 * (2 if amp else 4)
    assert reference_saved - saved == hidden_bytes  # exactly the GELU output


def test_swin_recomputed_gelu_same_gradients_less_saved():
    """MODEL.SWIN.RECOMPUTE_GELU: the backbone's features and gradients equal timm's MLP's, and
    it keeps less for the backward (by the hidden activations of every block)."""
    plain_saved, saved, _ = _swin_variant_equals_plain({}, dict(recompute_gelu=True))
    # Hidden tokens x width of every block's MLP (fp32 here): 4x the block's channels.
    hidden = sum(2 * (96 // 4 // 2**s) * (160 // 4 // 2**s) * 4 * 16 * 2**s * 4 * depth
                 for s, depth in enumerate(SWIN_ARCH["depths"]))
    assert plain_saved - saved == hidden


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_equals_timm_written_out_and_keeps_no_probabilities(amp, shifted, device):
    """Same output and gradients (q, k, v and the position bias) as the written-out attention,
    in float32 and as bf16 autocast runs it (CUDA's autocast runs softmax in float32, the CPU's
    in its input's dtype), with and without a shift mask; the probabilities are not kept for
    the backward."""
    from ddl_mask2former.modeling.backbone.window_attention import window_attention

    torch.manual_seed(0)
    windows, heads, tokens, width, scale = 4, 2, 49, 8, 8 ** -0.5
    qkv = torch.randn(3, 2 * windows, heads, tokens, width).to(device)
    bias = torch.randn(1, heads, tokens, tokens).to(device)
    mask = None
    if shifted:
        regions = torch.randint(0, 2, (windows, tokens))
        mask = torch.zeros(windows, tokens, tokens).masked_fill(regions[:, :, None] != regions[:, None, :], float("-inf"))
        mask = mask.to(device)
    results = []
    for use_function in (False, True):
        q, k, v, b = (t.clone().requires_grad_(True) for t in (*qkv, bias))

        def run():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                qs, ks, vs = (t.to(torch.bfloat16) if amp else t for t in (q, k, v))  # what a qkv linear gives
                if use_function:
                    return window_attention(qs, ks, vs, b, mask, scale)
                attn = qs * scale @ ks.transpose(-2, -1) + b
                if mask is not None:
                    attn = (attn.view(-1, windows, heads, tokens, tokens) + mask[None, :, None]).view(-1, heads, tokens, tokens)
                return attn.softmax(-1) @ vs
        output, saved = saved_bytes(run)
        output.float().square().sum().backward()
        results.append((output, saved, [t.grad for t in (q, k, v, b)]))
    (reference, reference_saved, reference_grads), (output, saved, grads) = results
    assert output.dtype == reference.dtype == (torch.bfloat16 if amp else torch.float32)
    # Bit-equal on the development machine; one bf16 rounding step of room for other kernels.
    tolerance = dict(rtol=4e-3, atol=1e-5) if amp else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(output, reference, **tolerance)
    for name, actual, expected in zip("qkvb", grads, reference_grads):
        torch.testing.assert_close(actual, expected, **tolerance, msg=name)
    # Kept: q, k, v, the bias and the mask; the float32 probabilities (and their bf16 copy) are not.
    kept = 3 * qkv[0].numel() * (2 if amp else 4) + bias.nbytes + (0 if mask is None else mask.nbytes)
    assert saved == kept
    probabilities = 2 * windows * heads * tokens * tokens * (6 if amp else 4)
    assert reference_saved >= probabilities + 3 * qkv[0].numel() * (2 if amp else 4)


def test_swin_recomputed_attention_same_gradients_less_saved():
    """MODEL.SWIN.RECOMPUTE_ATTENTION: the backbone's features and gradients equal timm's
    attention's (with shifted windows and padding), it keeps less for the backward, and without
    autograd timm's own forward runs."""
    plain_saved, saved, recomputing = _swin_variant_equals_plain({}, dict(recompute_attention=True))
    # Each block's float32 probabilities: windows x heads x 49 x 49 (feature maps padded to 7s).
    probabilities = 0
    for stage, depth in enumerate(SWIN_ARCH["depths"]):
        h, w = (-(-(side // 4 // 2**stage) // 7) * 7 for side in (96, 160))
        probabilities += depth * 2 * (h * w // 49) * SWIN_ARCH["num_heads"][stage] * 49 * 49 * 4
    assert plain_saved - saved >= probabilities
    with torch.no_grad():
        calls = []
        attention = next(m for m in recomputing.modules() if hasattr(m, "qkv"))
        attention.softmax.register_forward_hook(lambda *args: calls.append(1))
        recomputing(torch.randn(1, 3, 96, 160))
    assert calls  # timm's forward (its softmax module) when no gradient is taken


def test_swin_grad_checkpointing_same_gradients_less_saved():
    """MODEL.SWIN.GRAD_CHECKPOINTING: same features and gradients; the backward keeps only each
    block's input (held by the checkpoint, outside autograd's saved tensors) instead of its
    activations."""
    plain_saved, saved, _ = _swin_variant_equals_plain({}, dict(grad_checkpointing=True))
    assert saved < plain_saved / 3


@pytest.mark.slow
def test_swin_backbone_with_recomputations_compiles_without_graph_breaks():
    """The recomputed GELU and attention are traced by dynamo whole (one graph, no break), and
    the traced backward (aot_eager) gives the eager gradients, under bf16 autocast."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = D2SwinTransformer(**SWIN_ARCH, drop_path_rate=0.0, recompute_gelu=True, recompute_attention=True)
    image = torch.randn(2, 3, 96, 160)

    def loss(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sum(value.float().square().mean() for value in model(x).values())
    loss(image).backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.compile(loss, backend=counter)(image).backward()
    dynamo.reset()
    assert counter.frame_count == 1  # a graph break would split the function into more frames
    for (name, parameter), expected in zip(model.named_parameters(), eager):
        torch.testing.assert_close(parameter.grad, expected, rtol=0, atol=0, msg=name)
