"""MSDeformAttn: initialisation, shapes, padding, autocast and input checks (CPU)."""
import math

import pytest
import torch

from ddl_mask2former.ops import MSDeformAttn
from ops_helpers import level_layout

LEVELS = ((6, 8), (3, 4), (2, 2))


def _module_inputs(module, batch=2, n_queries=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes, starts, total_len = level_layout(LEVELS)
    query = torch.randn(batch, n_queries, module.d_model, generator=generator)
    reference_points = torch.rand(batch, n_queries, len(LEVELS), 2, generator=generator)
    input_flatten = torch.randn(batch, total_len, module.d_model, generator=generator)
    return query, reference_points, input_flatten, shapes, starts


def test_initial_offsets_are_rays_and_weights_uniform():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0
    rays = module.sampling_offsets.bias.view(8, 3, 4, 2)
    for head in range(8):
        angle = 2 * math.pi * head / 8
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for point in range(4):
            # Same ray on every level, point k at (k + 1) times the unit-square direction.
            expected = direction * (point + 1)
            torch.testing.assert_close(rays[head, :, point], expected.expand(3, 2), rtol=0, atol=1e-6)


def test_output_shape_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    output = module(*_module_inputs(module))
    assert output.shape == (2, 7, 32)
    output.square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # Zero-initialised weight matrices still receive a gradient (training can move them).
    assert module.sampling_offsets.weight.grad.abs().sum() > 0
    assert module.attention_weights.weight.grad.abs().sum() > 0


def test_padded_positions_do_not_change_the_output():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3)
    query, reference_points, input_flatten, shapes, starts = _module_inputs(module)
    padding_mask = torch.zeros(input_flatten.shape[:2], dtype=torch.bool)
    padding_mask[:, 10:30] = True
    padding_mask[1, 50:] = True
    output = module(query, reference_points, input_flatten, shapes, starts, padding_mask)
    changed = input_flatten.clone()
    changed[padding_mask] = 1e3
    output_changed = module(query, reference_points, changed, shapes, starts, padding_mask)
    torch.testing.assert_close(output, output_changed, rtol=0, atol=0)
    unmasked = module(query, reference_points, changed, shapes, starts, None)
    assert not torch.allclose(output, unmasked)


def test_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2)
    query, reference_points, input_flatten, shapes, starts = _module_inputs(module)
    expected = module(query, reference_points, input_flatten, shapes, starts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = module(query.bfloat16(), reference_points, input_flatten.bfloat16(), shapes, starts)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, rtol=2e-2, atol=2e-2)


def test_half_projections_under_autocast_keep_float32_positions_and_save_less():
    """fp32_projections=False: value and output projections in autocast's dtype (bf16 output, the
    value the op keeps is bf16), offsets, weights and sampling in float32; close to the float32
    layer, and less kept for the backward than with fp32_projections=True."""
    torch.manual_seed(0)
    full = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2)
    half = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2, fp32_projections=False)
    with torch.no_grad():  # non-trivial offsets and weights
        for parameter in full.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    half.load_state_dict(full.state_dict())
    query, reference_points, input_flatten, shapes, starts = _module_inputs(full)
    expected = full(query, reference_points, input_flatten, shapes, starts)
    offsets_dtypes = []
    half.sampling_offsets.register_forward_hook(lambda module, inputs, output: offsets_dtypes.append(output.dtype))

    def saved_bytes(module):
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor
        leaf = input_flatten.bfloat16().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = module(query.bfloat16(), reference_points, leaf, shapes, starts)
        return output, sum(storages.values())

    output, half_saved = saved_bytes(half)
    _, full_saved = saved_bytes(full)
    assert output.dtype == torch.bfloat16 and offsets_dtypes == [torch.float32]
    torch.testing.assert_close(output.float(), expected, rtol=3e-2, atol=3e-2)
    assert half_saved < 0.85 * full_saved, (half_saved, full_saved)


def test_bad_configuration_and_inputs_raise():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2)
    query, reference_points, input_flatten, shapes, starts = _module_inputs(module)
    with pytest.raises(ValueError, match="reference_points"):
        module(query, reference_points[:, :, :2], input_flatten, shapes, starts)
    with pytest.raises(ValueError, match="input_padding_mask"):
        module(query, reference_points, input_flatten, shapes, starts,
               torch.zeros(input_flatten.shape[:2], dtype=torch.uint8))
    with pytest.raises(ValueError, match="input_spatial_shapes"):
        module(query, reference_points, input_flatten, shapes[:2], starts[:2])
    with pytest.raises(ValueError, match="query"):
        module(query[..., :8], reference_points, input_flatten, shapes, starts)
