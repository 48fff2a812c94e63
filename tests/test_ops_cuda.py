"""The compiled CUDA op against the PyTorch path (needs a GPU and the built extension)."""
import importlib
import logging
import shutil

import pytest
import torch

from ddl_mask2former.ops import MSDeformAttn, compiled_op_available, ms_deform_attn, ms_deform_attn_pytorch
from ddl_mask2former.ops import ms_deform_attn_func
from ops_helpers import level_layout, make_inputs, set_border_locations

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (head_dim, levels): head dims cover every vector width (4, 2, 1 channels per thread) and every
# reduction mode of the backward kernel (one group per head within a warp, per-warp atomics for
# 64 channels one at a time, per-thread atomics for 3 and for 6 in pairs).
CASES = [
    (32, ((8, 10), (4, 5), (2, 3))),
    (8, ((7, 3), (1, 1))),
    (64, ((5, 6), (3, 3))),
    (6, ((5, 4), (2, 2))),
    (3, ((4, 5), (2, 2), (1, 3))),
]


@pytest.fixture(params=[0, 1], ids=["widest", "one_channel"])
def kernel_variant(request, monkeypatch):
    """Runs a test with the vectorized kernels (widest channel packs) and with one channel per thread."""
    monkeypatch.setattr(ms_deform_attn_func, "_channels_per_thread", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _compiled_op_required(monkeypatch):
    monkeypatch.delenv("DDL_MSDA_FORCE_PYTORCH", raising=False)
    if not compiled_op_available():
        if shutil.which("nvcc") is not None:
            pytest.fail("a GPU and nvcc are present but ddl_mask2former.ops._C was not built")
        pytest.skip("ddl_mask2former.ops._C is not built (no nvcc)")


def _cuda_inputs(head_dim, levels, dtype, device="cuda", seed=0, n_queries=6, location_range=(-0.2, 1.2)):
    inputs = list(make_inputs(batch=2, n_queries=n_queries, n_heads=3, head_dim=head_dim, level_shapes=levels,
                              n_points=4, dtype=torch.float64, seed=seed, location_range=location_range))
    inputs[3] = set_border_locations(inputs[3], levels)
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs]


def _smooth_coordinates(locations, levels):
    """True per (x, y) coordinate away from pixel centers, where bilinear gradients jump."""
    sizes = torch.tensor([[w, h] for h, w in levels], dtype=torch.float64, device=locations.device)
    pixel = locations.double() * sizes[None, None, None, :, None, :] - 0.5
    return (pixel - pixel.round()).abs() > 1e-3


def _assert_matches(compiled, reference, locations, levels, rtol, atol):
    """Outputs and value/weight gradients everywhere; location gradients off the kinks."""
    smooth = _smooth_coordinates(locations, levels)
    names = ["output", "grad_value", "grad_locations", "grad_weights"]
    for name, got, expected in zip(names, compiled, reference):
        assert torch.isfinite(got).all(), name
        if name == "grad_locations":
            # Exactly on a pixel center the two paths may round to different sides of the kink.
            got, expected = got[smooth], expected[smooth]
        torch.testing.assert_close(got.float() if got.dtype in (torch.float16, torch.bfloat16) else got,
                                   expected, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _forward_backward(function, inputs, grad_output):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    output = function(*leaves)
    output.backward(grad_output)
    return output.detach(), leaves[0].grad, leaves[3].grad, leaves[4].grad


@pytest.mark.parametrize("head_dim,levels", CASES, ids=[f"head_dim{c[0]}" for c in CASES])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-3, 1e-4)],
                         ids=["float64", "float32"])
def test_compiled_matches_pytorch_forward_and_backward(head_dim, levels, dtype, rtol, atol, kernel_variant):
    inputs = _cuda_inputs(head_dim, levels, dtype)
    grad_output = torch.randn(2, 6, 3 * head_dim, device="cuda", dtype=dtype,
                              generator=torch.Generator("cuda").manual_seed(1))
    compiled = _forward_backward(ms_deform_attn, inputs, grad_output)
    reference = _forward_backward(ms_deform_attn_pytorch, inputs, grad_output)
    _assert_matches(compiled, reference, inputs[3], levels, rtol, atol)


def test_many_queries_on_the_same_pixels_accumulate_atomically(kernel_variant):
    # 400 queries sampling a tiny area stress the atomic scatter of the value gradient.
    levels = ((6, 6), (3, 3))
    inputs = _cuda_inputs(32, levels, torch.float64, n_queries=400, location_range=(0.45, 0.55))
    grad_output = torch.randn(2, 400, 96, device="cuda", dtype=torch.float64,
                              generator=torch.Generator("cuda").manual_seed(2))
    compiled = _forward_backward(ms_deform_attn, inputs, grad_output)
    reference = _forward_backward(ms_deform_attn_pytorch, inputs, grad_output)
    _assert_matches(compiled, reference, inputs[3], levels, 1e-10, 1e-10)


def test_gradcheck_compiled_op(kernel_variant):
    value, shapes, starts, locations, weights = _cuda_inputs(4, ((3, 4), (2, 2)), torch.float64, n_queries=2)
    value.requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)
    # Border points sit exactly on the kinks of bilinear sampling; gradcheck needs smooth points.
    with torch.no_grad():
        locations[:, 0] = 0.1 + 0.8 * torch.rand_like(locations[:, 0])
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w),
        (value, locations, weights), eps=1e-6, atol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_inputs(dtype, kernel_variant):
    levels = CASES[0][1]
    inputs32 = _cuda_inputs(32, levels, torch.float32)
    inputs16 = [t.to(dtype) if t.is_floating_point() else t for t in inputs32]
    inputs_rounded = [t.float() if t.is_floating_point() else t for t in inputs16]
    grad_output = torch.randn(2, 6, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    half = _forward_backward(ms_deform_attn, inputs16, grad_output.to(dtype))
    full = _forward_backward(ms_deform_attn_pytorch, inputs_rounded, grad_output.to(dtype).float())
    assert all(t.dtype == dtype for t in half)
    tolerance = 1e-2 if dtype == torch.float16 else 5e-2
    _assert_matches(half, full, inputs_rounded[3], levels, tolerance, tolerance)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least two CUDA devices")
def test_runs_on_a_non_zero_device_index():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    inputs = _cuda_inputs(32, CASES[0][1], torch.float64, device=device)
    grad_output = torch.randn(2, 6, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(device)
    assert torch.cuda.current_device() != device.index
    compiled = _forward_backward(ms_deform_attn, inputs, grad_output)
    assert all(t.device == device for t in compiled)
    cpu_inputs = [t.cpu() for t in inputs]
    reference = _forward_backward(ms_deform_attn_pytorch, cpu_inputs, grad_output.cpu())
    _assert_matches([t.cpu() for t in compiled], reference, cpu_inputs[3], CASES[0][1], 1e-10, 1e-10)


def test_runs_on_the_current_stream():
    inputs = _cuda_inputs(32, CASES[0][1], torch.float32)
    expected = ms_deform_attn_pytorch(*inputs)
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        output = ms_deform_attn(*inputs)
    side_stream.synchronize()
    torch.testing.assert_close(output, expected, rtol=1e-3, atol=1e-4)


def test_misaligned_value_falls_back_to_narrower_packs():
    # A view starting one element in breaks 16-byte alignment; results must not change.
    value, shapes, starts, locations, weights = _cuda_inputs(32, CASES[0][1], torch.float32)
    shifted = torch.empty(value.numel() + 1, device="cuda", dtype=value.dtype)[1:].view_as(value)
    shifted.copy_(value)
    torch.testing.assert_close(ms_deform_attn(shifted, shapes, starts, locations, weights),
                               ms_deform_attn(value, shapes, starts, locations, weights), rtol=1e-6, atol=1e-6)


def test_kernel_errors_are_python_exceptions():
    extension = importlib.import_module("ddl_mask2former.ops._C")
    value, shapes, starts, locations, weights = _cuda_inputs(8, ((3, 3),), torch.float32)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ms_deform_attn(value, shapes, starts, locations.cpu(), weights)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        extension.ms_deform_attn_forward(value, shapes, starts, locations, weights.to(torch.complex64))
    with pytest.raises(RuntimeError, match="channels_per_thread"):
        extension.ms_deform_attn_forward(value, shapes, starts, locations, weights, channels_per_thread=3)
    with pytest.raises(RuntimeError, match="int64"):
        extension.ms_deform_attn_forward(value, shapes.int(), starts, locations, weights)
    with pytest.raises(RuntimeError, match="attention_weights must have"):
        extension.ms_deform_attn_forward(value, shapes, starts, locations, weights[..., :1])


def test_compiled_path_is_logged_once(caplog):
    inputs = _cuda_inputs(8, ((3, 3),), torch.float32)
    ms_deform_attn_func._logged_paths.clear()
    with caplog.at_level(logging.INFO, logger="ddl_mask2former.ops"):
        ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    assert sum("compiled CUDA op" in r.getMessage() for r in caplog.records) == 1


def test_module_under_autocast_on_gpu_matches_float32_cpu():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=4)
    levels = ((8, 8), (4, 4), (2, 2))
    shapes, starts, total_len = level_layout(levels)
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 20, 64, generator=generator)
    reference_points = torch.rand(2, 20, 3, 2, generator=generator)
    input_flatten = torch.randn(2, total_len, 64, generator=generator)
    expected = module(query, reference_points, input_flatten, shapes, starts)
    module_gpu = module.cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        output = module_gpu(query.cuda().half(), reference_points.cuda(), input_flatten.cuda().half(),
                            shapes.cuda(), starts.cuda())
    assert output.dtype == torch.float32
    torch.testing.assert_close(output.cpu(), expected, rtol=1e-2, atol=1e-2)
