"""Training behaviour: a fixed batch is overfit, checkpoints round-trip, autocast keeps losses finite."""
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer

from model_helpers import build, eval_inputs, tiny_cfg, training_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _iou(pred, target):
    union = (pred | target).sum().item()
    return (pred & target).sum().item() / max(union, 1)


@pytest.mark.slow
def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = build(tiny_cfg())
    batch = training_batch(64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    history = []
    for _ in range(40):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert history[-1] < history[0] / 5, history

    model.eval()
    with torch.no_grad():
        real, fake = model(eval_inputs(batch))
    target = batch[1]["forgery_mask"].bool()
    assert _iou(fake["mask"], target) > 0.8
    assert real["mask"].sum().item() < 0.05 * target.sum().item()
    assert fake["fake_prob"].item() > real["fake_prob"].item()


def test_save_and_load_give_identical_outputs(tmp_path):
    cfg = tiny_cfg()
    model = build(cfg, seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = training_batch()
    for _ in range(2):  # move away from the initialization so the check is not trivial
        optimizer.zero_grad()
        sum(model(batch).values()).backward()
        optimizer.step()
    model.eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")

    restored = build(cfg, seed=123).eval()
    DetectionCheckpointer(restored).load(str(tmp_path / "model_final.pth"))
    inputs = eval_inputs(batch, height=80, width=72)
    with torch.no_grad():
        expected, actual = model(inputs), restored(inputs)
    for a, b in zip(expected, actual):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_losses_finite_under_cpu_autocast():
    model = build(tiny_cfg())
    model.train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses = model(training_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
