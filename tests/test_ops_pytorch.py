"""The PyTorch path of ms_deform_attn: exact against a naive reference, gradients, dispatch, errors."""
import logging
import types

import pytest
import torch

from ddl_mask2former.ops import (
    FORCE_PYTORCH_ENV,
    force_pytorch_requested,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)
from ddl_mask2former.ops import ms_deform_attn_func
from ops_helpers import make_inputs, naive_ms_deform_attn, set_border_locations

LEVELS = ((4, 5), (3, 2), (1, 1))


def test_matches_naive_reference_inside_outside_and_on_borders():
    inputs = list(make_inputs(batch=2, n_queries=4, n_heads=2, head_dim=3, level_shapes=LEVELS, n_points=4))
    inputs[3] = set_border_locations(inputs[3], LEVELS)
    expected = naive_ms_deform_attn(*inputs)
    result = ms_deform_attn_pytorch(*inputs)
    assert result.shape == (2, 4, 2 * 3)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_level_shapes_given_as_ints_read_nothing_back_and_give_the_same_result(monkeypatch):
    inputs = make_inputs(batch=2, n_queries=4, n_heads=2, head_dim=3, level_shapes=LEVELS, n_points=4)
    expected = ms_deform_attn_pytorch(*inputs)
    # With level_shapes the sizes are never read from the tensors (what the exporters need).
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist called"))
    torch.testing.assert_close(ms_deform_attn_pytorch(*inputs, level_shapes=list(LEVELS)), expected,
                               rtol=0, atol=0)
    torch.testing.assert_close(ms_deform_attn(*inputs, level_shapes=list(LEVELS)), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 level_shapes for 3 levels"):
        ms_deform_attn_pytorch(*inputs, level_shapes=list(LEVELS[:2]))


def test_points_far_outside_sample_zero():
    value, shapes, starts, locations, weights = make_inputs(level_shapes=LEVELS)
    locations = torch.full_like(locations, -5.0)
    output = ms_deform_attn_pytorch(value, shapes, starts, locations, weights)
    assert torch.count_nonzero(output) == 0


def test_pixel_center_returns_that_pixel():
    value, shapes, starts, locations, weights = make_inputs(batch=1, n_queries=1, n_heads=1, head_dim=2,
                                                            level_shapes=((3, 4),), n_points=1)
    # Center of pixel (row 2, col 1) of a 3x4 map, full weight on it.
    locations[..., 0] = (1 + 0.5) / 4
    locations[..., 1] = (2 + 0.5) / 3
    weights.fill_(1.0)
    output = ms_deform_attn_pytorch(value, shapes, starts, locations, weights)
    torch.testing.assert_close(output[0, 0], value[0, 2 * 4 + 1, 0], rtol=0, atol=1e-14)


def test_gradcheck_pytorch_path():
    value, shapes, starts, locations, weights = make_inputs(batch=1, n_queries=2, n_heads=2, head_dim=2,
                                                            level_shapes=((3, 4), (2, 2)), n_points=2, seed=3)
    value.requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_pytorch(v, shapes, starts, loc, w),
        (value, locations, weights), eps=1e-6, atol=1e-5,
    )


def test_float32_close_to_float64():
    inputs64 = make_inputs(level_shapes=LEVELS, seed=5)
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    torch.testing.assert_close(ms_deform_attn_pytorch(*inputs32).double(), ms_deform_attn_pytorch(*inputs64),
                               rtol=1e-5, atol=1e-6)


def test_dispatch_on_cpu_is_pytorch_path(caplog):
    inputs = make_inputs(level_shapes=LEVELS)
    ms_deform_attn_func._logged_paths.clear()
    with caplog.at_level(logging.INFO, logger="ddl_mask2former.ops"):
        first = ms_deform_attn(*inputs)
        second = ms_deform_attn(*inputs)
    torch.testing.assert_close(first, ms_deform_attn_pytorch(*inputs), rtol=0, atol=0)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    path_records = [r for r in caplog.records if "PyTorch path" in r.getMessage()]
    assert len(path_records) == 1, "the path in use must be logged exactly once"


def test_force_pytorch_environment_variable(monkeypatch, caplog):
    monkeypatch.setenv(FORCE_PYTORCH_ENV, "1")
    assert force_pytorch_requested()
    ms_deform_attn_func._logged_paths.clear()
    with caplog.at_level(logging.INFO, logger="ddl_mask2former.ops"):
        ms_deform_attn(*make_inputs(level_shapes=LEVELS))
    assert any(FORCE_PYTORCH_ENV in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(FORCE_PYTORCH_ENV, "0")
    assert not force_pytorch_requested()
    monkeypatch.setenv(FORCE_PYTORCH_ENV, "maybe")
    with pytest.raises(ValueError, match=FORCE_PYTORCH_ENV):
        ms_deform_attn(*make_inputs(level_shapes=LEVELS))


@pytest.mark.parametrize("broken", ["value_dims", "shapes_dtype", "start_len", "heads", "weights", "total_len"])
def test_bad_inputs_raise_clear_errors(broken):
    value, shapes, starts, locations, weights = make_inputs(level_shapes=LEVELS)
    if broken == "value_dims":
        value = value[0]
    elif broken == "shapes_dtype":
        shapes = shapes.int()
    elif broken == "start_len":
        starts = starts[:-1]
    elif broken == "heads":
        locations = locations[:, :, :1]
    elif broken == "weights":
        weights = weights[..., :1]
    elif broken == "total_len":
        value = value[:, :-1]
    with pytest.raises((ValueError, TypeError), match="ms_deform_attn"):
        ms_deform_attn(value, shapes, starts, locations, weights)


def test_half_precision_on_cpu_runs_close_to_float32():
    inputs32 = make_inputs(level_shapes=LEVELS, dtype=torch.float32, seed=7)
    inputs16 = [t.bfloat16() if t.is_floating_point() else t for t in inputs32]
    output16 = ms_deform_attn(*inputs16)
    assert output16.dtype == torch.bfloat16
    torch.testing.assert_close(output16.float(), ms_deform_attn(*inputs32), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("failure,tolerated", [
    (ModuleNotFoundError("No module named 'ddl_mask2former.ops._C'", name="ddl_mask2former.ops._C"), True),
    (ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency"), False),
    (ImportError("_C.so: undefined symbol: _ZN3c10", name="ddl_mask2former.ops._C"), False),
])
def test_only_a_missing_extension_is_tolerated(monkeypatch, failure, tolerated):
    def failing_import(name):
        raise failure

    monkeypatch.setattr(ms_deform_attn_func, "_extension_checked", False)
    monkeypatch.setattr(ms_deform_attn_func, "_extension", None)
    monkeypatch.setattr(ms_deform_attn_func, "importlib", types.SimpleNamespace(import_module=failing_import))
    if tolerated:
        assert ms_deform_attn_func.compiled_op_available() is False
    else:
        with pytest.raises(ImportError, match=str(failure)):
            ms_deform_attn_func.compiled_op_available()


def test_half_value_with_float32_positions_is_sampled_in_float32():
    """As the CUDA op: a bf16 value with float32 positions and weights is sampled in float32 (a
    bf16 grid would move points by up to a quarter pixel on a 64-px level); the output is bf16.
    The registered operator's CPU gradients follow the same rule."""
    from ddl_mask2former.ops import ms_deform_attn_op

    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32, level_shapes=((64, 48), (9, 7)))
    half_value = value.bfloat16()
    output = ms_deform_attn_pytorch(half_value, shapes, starts, locations, weights)
    expected = ms_deform_attn_pytorch(half_value.float(), shapes, starts, locations, weights)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, expected.bfloat16(), rtol=0, atol=0)
    leaves = [half_value.clone().requires_grad_(), locations.clone().requires_grad_(), weights.clone().requires_grad_()]
    ms_deform_attn_op(leaves[0], shapes, starts, leaves[1], leaves[2], 0).float().sum().backward()
    reference = [half_value.float().requires_grad_(), locations.clone().requires_grad_(),
                 weights.clone().requires_grad_()]
    ms_deform_attn_pytorch(reference[0], shapes, starts, reference[1], reference[2]).sum().backward()
    for leaf, ref in zip(leaves, reference):
        assert leaf.grad.dtype == leaf.dtype
        torch.testing.assert_close(leaf.grad, ref.grad.to(leaf.dtype), rtol=1e-6, atol=1e-6)
