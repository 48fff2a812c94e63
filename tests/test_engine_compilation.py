"""``engine/compilation.py``: ``torch.compile`` of named parts in place, training only
(``SOLVER.COMPILE``), the whole network and the losses as two graphs, channels-last weights."""
import os

import pytest
import torch
from torch import nn

from ddl_mask2former.engine.compilation import apply_memory_format, compile_submodules


def test_compile_submodules_in_place_keeps_state_dict_keys_and_compiles_training_only():
    """Compiled in place (state-dict keys unchanged); the compiled code runs in training mode only,
    so evaluation on images of new sizes does not compile again."""
    from torch._dynamo.testing import CompileCounter

    model = nn.Sequential()
    model.backbone = nn.Conv2d(3, 4, 3)
    model.head = None
    keys = list(model.state_dict())
    counter = CompileCounter()
    torch._dynamo.reset()
    assert compile_submodules(model, ["backbone", "head"], backend=counter) == ["backbone"]
    assert list(model.state_dict()) == keys
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(2, 3, size, size, generator=generator) for size in (8, 11, 13)]
    model.train()
    model.backbone(images[0])
    assert counter.frame_count == 1
    model.eval()
    with torch.no_grad():
        for image in images[1:]:
            torch.testing.assert_close(model.backbone(image), nn.functional.conv2d(
                image, model.backbone.weight, model.backbone.bias))
    assert counter.frame_count == 1  # evaluation ran eagerly
    everywhere = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    compile_submodules(everywhere, ["0"], backend=counter, training_only=False)
    with torch.no_grad():
        everywhere(images[1])
    assert counter.frame_count == 2
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="no submodule 'pixel_decoder'"):
        compile_submodules(model, ["pixel_decoder"])


def test_channels_last_option_converts_conv_weights():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    reference = model(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    apply_memory_format(model, True)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    output = model(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(output, reference, atol=1e-5)


_INDUCTOR_TESTS = os.environ.get("DDL_INDUCTOR_TESTS", "").strip().lower() in {"1", "true", "yes", "on"}


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
        not _INDUCTOR_TESTS, reason="inductor compiles the tiny model's step for 2-3 minutes on a "
        "2-core CPU; set DDL_INDUCTOR_TESTS=1 to run it")]),
])
def test_compiling_the_network_and_the_criterion_gives_two_graphs_and_the_eager_step(backend):
    """SOLVER.COMPILE.MODULES ["network", "criterion"]: backbone, heads and decoders in one graph
    (the deformable attention is a registered operator, traced here through its CPU kernel), the
    losses in another, reused by a batch with another real/fake arrangement; losses and
    gradients equal the eager step's. aot_eager checks the capture (dynamo and AOT autograd);
    inductor also its code generation (C++ on the CPU, as Triton would be on a GPU), with
    inductor's random numbers replaced by eager's so that the losses sample the same points."""
    import torch._dynamo as dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.testing import CompileCounterWithBackend

    from model_helpers import build, tiny_cfg, training_batch

    real, fake = training_batch()
    batches = [[real, fake], [fake, dict(fake, image=fake["image"].flip(-1))]]

    def step(model, batch):
        torch.manual_seed(3)  # the matcher's and criterion's random points
        losses = model(batch)
        sum(losses.values()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in losses.items()}, grads

    cfg = tiny_cfg()
    cfg.MODEL.DDL.PIXEL_DECODER.REGISTERED_OP = True  # traced through the op's CPU kernel
    eager_model = build(cfg).train()
    expected = [step(eager_model, batch) for batch in batches]
    model = build(cfg).train()
    dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    assert compile_submodules(model, ["network", "criterion"], backend=counter) == ["network", "criterion"]
    with inductor_config.patch(fallback_random=True):
        got = [step(model, batch) for batch in batches]
    model.eval()
    with torch.no_grad():  # evaluation runs eagerly: nothing compiled for a new image size
        model([dict(real, image=real["image"][:, :-32])])
    dynamo.reset()
    assert counter.frame_count == 2  # no graph break, no recompilation for the second batch
    assert list(model.state_dict()) == list(eager_model.state_dict())
    for (losses, grads), (eager_losses, eager_grads) in zip(got, expected):
        for name, value in eager_losses.items():
            torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert grads.keys() == eager_grads.keys()
        for name, grad in eager_grads.items():
            if backend == "aot_eager":  # the same aten operators in the same order
                torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
            else:  # fused kernels sum in another order: measured 1e-5 of each gradient's norm
                error = (grads[name] - grad).norm().item()
                assert error <= 1e-4 * grad.norm().item() + 1e-5, (name, error, grad.norm().item())
