"""MODEL.DDL.NOISE_RESIDUALS: fixed high-pass input channels for from-scratch training."""
import numpy as np
import pytest
import torch

from model_helpers import build, eval_inputs, tiny_cfg, training_batch
from ddl_mask2former.modeling.noise_residuals import NoiseResiduals

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_residuals_ignore_smooth_content_and_see_noise():
    residuals = NoiseResiduals(in_channels=3)
    ramp = torch.linspace(0, 255, 64).expand(3, 64, 64)[None]  # linear gradient: no residual
    out = residuals(ramp)
    assert out.shape == (1, 9, 64, 64)
    assert out[..., 2:-2, 2:-2].abs().max() < 1e-4
    generator = torch.Generator().manual_seed(0)
    noisy = 128 + 4 * torch.randn(1, 3, 64, 64, generator=generator)
    assert out.abs().mean() < residuals(noisy).abs().mean()
    # Edges are truncated, not passed through at full strength.
    step = torch.zeros(1, 3, 32, 32)
    step[..., 16:] = 255
    assert residuals(step).abs().max() <= residuals.truncation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residuals_under_autocast_equal_float32(dtype):
    """Autocast must not change the residuals: in bfloat16 the kernels' taps round and a flat
    image got a residual of ~1.2 gray levels that float32 inference never sees."""
    if dtype == torch.float16 and not torch.cuda.is_available():
        pytest.skip("float16 autocast runs on CUDA only")
    device = "cpu" if dtype == torch.bfloat16 else "cuda"
    residuals = NoiseResiduals(in_channels=3).to(device)
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, 48, 48, generator=generator) * 255).round().to(device)
    flat = torch.full((1, 3, 16, 16), 200.0, device=device)
    with torch.autocast(device, dtype=dtype):
        autocast_image, autocast_flat = residuals(image), residuals(flat)
    assert autocast_image.dtype == torch.float32
    torch.testing.assert_close(autocast_image, residuals(image), rtol=0, atol=0)
    assert autocast_flat.abs().max() < 1e-4


def test_model_with_residual_channels_trains_and_infers():
    cfg = tiny_cfg()
    cfg.MODEL.DDL.NOISE_RESIDUALS = True
    model = build(cfg)
    assert model.noise_residuals is not None
    batch = training_batch()
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # The patch embedding sees RGB plus 9 residual channels.
    first_conv = next(p for n, p in model.backbone.named_parameters() if p.dim() == 4)
    assert first_conv.shape[1] == 12
    model.eval()
    with torch.no_grad():
        outputs = model(eval_inputs(batch))
    assert all(np.isfinite(float(o["fake_prob"])) for o in outputs)
    assert outputs[1]["mask_prob"].shape == (64, 64)
