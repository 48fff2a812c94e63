"""The deformable encoder's FFN that recomputes its hidden in the backward
(``pixel_decoder/recomputed_ffn.py``, ``MODEL.DDL.PIXEL_DECODER.RECOMPUTE_FFN``)."""
import pytest
import torch
import torch.nn.functional as F

from ddl_mask2former.modeling.pixel_decoder.msdeform import DeformableEncoderLayer, MSDeformAttnPixelDecoder
from ddl_mask2former.modeling.pixel_decoder.recomputed_ffn import relu_ffn
from model_helpers import assert_same_step, saved_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("amp", [False, True])
def test_relu_ffn_equals_the_two_linears_and_keeps_no_hidden(amp):
    """Same output and gradients as linear2(relu(linear1(x))) in float32 and under bf16 autocast
    (as autocast runs it), with float32 inputs and weights; the 1024-wide hidden is not kept."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 16)
    linear1, linear2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    reference_saved, saved = assert_same_step(
        lambda inputs: linear2(F.relu(linear1(inputs))),
        lambda inputs: relu_ffn(inputs, linear1, linear2), x, (linear1, linear2), amp)
    hidden = 2 * 40 * 64 * (2 if amp else 4)
    weight_copies = 2 * 16 * 64 * 2 if amp else 0  # autocast's bf16 weights, which linear keeps
    assert reference_saved - saved == hidden + weight_copies


def test_relu_ffn_gradcheck():
    torch.manual_seed(0)
    linear1 = torch.nn.Linear(4, 6).double()
    linear2 = torch.nn.Linear(6, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = (linear1.weight, linear1.bias, linear2.weight, linear2.bias)
    assert torch.autograd.gradcheck(
        lambda x, *p: relu_ffn(x, type("L", (), {"weight": p[0], "bias": p[1]}),
                               type("L", (), {"weight": p[2], "bias": p[3]})), (x, *params))


def _encoder_layer_step(recompute, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = DeformableEncoderLayer(32, 64, n_levels=2, n_heads=4, n_points=2, dropout=dropout,
                                   recompute_ffn=recompute)
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])
    src = torch.randn(2, 20, 32, requires_grad=True)
    pos = torch.randn(2, 20, 32)
    reference_points = torch.rand(2, 20, 2, 2)
    torch.manual_seed(seed + 1)  # the same dropout masks for both variants
    output, saved = saved_bytes(lambda: layer(src, pos, reference_points, shapes, starts),
                                exclude=list(layer.parameters()))
    output.square().sum().backward()
    return layer, output, saved, src.grad


def test_encoder_layer_recomputing_its_ffn_gives_the_same_step_and_keeps_less():
    plain, plain_output, plain_saved, plain_grad = _encoder_layer_step(recompute=False)
    layer, output, saved, grad = _encoder_layer_step(recompute=True)
    torch.testing.assert_close(output, plain_output, rtol=0, atol=0)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(plain.named_parameters(), layer.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert plain_saved - saved == 2 * 20 * 64 * 4  # the float32 hidden


def test_encoder_layer_with_active_dropout_keeps_the_plain_ffn():
    """Dropout between the FFN's linears is not part of the recomputed function: with it active
    the layer runs (and keeps) the plain FFN, so the two variants match exactly."""
    _, plain_output, plain_saved, plain_grad = _encoder_layer_step(recompute=False, dropout=0.5)
    _, output, saved, grad = _encoder_layer_step(recompute=True, dropout=0.5)
    torch.testing.assert_close(output, plain_output, rtol=0, atol=0)
    torch.testing.assert_close(grad, plain_grad, rtol=0, atol=0)
    assert saved == plain_saved


def test_config_switch_reaches_every_encoder_layer():
    from model_helpers import tiny_cfg

    cfg = tiny_cfg()
    for value in (True, False):
        cfg.MODEL.DDL.PIXEL_DECODER.RECOMPUTE_FFN = value
        cfg.MODEL.DDL.PIXEL_DECODER.REGISTERED_OP = value
        from detectron2.layers import ShapeSpec
        shapes = {"res2": ShapeSpec(channels=8, stride=4), "res3": ShapeSpec(channels=16, stride=8),
                  "res4": ShapeSpec(channels=32, stride=16), "res5": ShapeSpec(channels=64, stride=32)}
        decoder = MSDeformAttnPixelDecoder(cfg, shapes)
        assert [layer.recompute_ffn for layer in decoder.encoder] == [value] * len(decoder.encoder)
        assert [layer.self_attn.registered_op for layer in decoder.encoder] == [value] * len(decoder.encoder)
