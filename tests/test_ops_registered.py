"""``torch.ops.ddl_mask2former.ms_deform_attn``: the registered operator (``REGISTERED_OP``).

Checked here through its CPU kernel (the PyTorch path, recomputed in the backward): the schema,
fake-tensor and autograd registrations (``torch.library.opcheck``), equality with the plain
PyTorch path, and that the pixel decoder's attention layer compiles as one graph through it.
The CUDA kernels behind the same registration are tested in ``test_ops_cuda.py``.
"""
import functools

import pytest
import torch

from ddl_mask2former.ops import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_op,
    ms_deform_attn_pytorch,
)
from ops_helpers import level_layout, make_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _needs_kernels(device):
    if device == "cuda":
        from ddl_mask2former.ops import compiled_op_available

        if not compiled_op_available():
            pytest.skip("ddl_mask2former.ops._C was not built: no CUDA kernels to register")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_schema_fake_tensors_and_autograd(device, dtype):
    _needs_kernels(device)
    inputs = list(make_inputs(dtype=dtype, device=device))
    for index in (0, 3, 4):
        inputs[index].requires_grad_()
    torch.library.opcheck(ms_deform_attn_op, (*inputs, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_op_equals_the_pytorch_path_forward_and_backward(device):
    _needs_kernels(device)
    inputs = make_inputs(dtype=torch.float64, device=device)
    grad_output = torch.randn(2, 5, 6, dtype=torch.float64, device=device,
                              generator=torch.Generator(device).manual_seed(1))

    def run(function):
        leaves = [t.clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
        output = function(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2])
        output.backward(grad_output)
        return [output.detach()] + [leaf.grad for leaf in leaves]

    expected = run(ms_deform_attn_pytorch)
    actual = run(lambda *args: ms_deform_attn_op(*args, 0))
    for name, got, want in zip(["output", "value", "locations", "weights"], actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


def test_gradcheck_through_the_registered_op():
    inputs = [t.clone() for t in make_inputs(n_queries=3, level_shapes=((3, 4), (2, 2)))]
    for index in (0, 3, 4):
        inputs[index].requires_grad_()
    assert torch.autograd.gradcheck(lambda *args: ms_deform_attn_op(*args, 0), tuple(inputs))


def _saved_for_backward(function, *args):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function(*args)
    return output, saved


def test_dispatch_uses_the_op_on_cpu_only_when_asked():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(dtype=torch.float32)
    value.requires_grad_()
    args = (value, spatial_shapes, level_start_index, locations, weights)
    plain, plain_saved = _saved_for_backward(ms_deform_attn, *args)
    through_op, op_saved = _saved_for_backward(functools.partial(ms_deform_attn, registered_op=True), *args)
    assert "ms_deform_attn" not in plain.grad_fn.name().lower()
    assert "ms_deform_attn" in through_op.grad_fn.name().lower()
    torch.testing.assert_close(through_op, plain, rtol=0, atol=0)
    # The op keeps its five inputs and nothing else, as on a GPU; the plain path keeps samples too.
    inputs = [t.data_ptr() for t in args]
    assert [t.data_ptr() for t in op_saved] == inputs
    assert any(t.data_ptr() not in inputs for t in plain_saved)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_layer_compiles_as_one_graph_through_the_op(device):
    """On CUDA the op's kernels are a pybind function, which dynamo cannot trace: without the
    registration the pixel decoder's graph broke at every attention layer."""
    _needs_kernels(device)
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, registered_op=True).to(device)
    with torch.no_grad():  # non-trivial offsets and weights
        for parameter in layer.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    spatial_shapes, level_start_index, total = level_layout(((6, 5), (3, 3)), device)
    generator = torch.Generator().manual_seed(2)
    source = torch.randn(2, total, 16, generator=generator).to(device)
    query = torch.randn(2, total, 16, generator=generator).to(device)
    reference = torch.rand(2, total, 2, 2, generator=generator).to(device)

    def step(module):
        output = module(query, reference, source, spatial_shapes, level_start_index)
        output.square().sum().backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
        layer.zero_grad()
        return output.detach(), grads

    explanation = torch._dynamo.explain(layer)(query, reference, source, spatial_shapes,
                                               level_start_index)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    expected_output, expected_grads = step(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    output, grads = step(compiled)
    torch._dynamo.reset()
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
