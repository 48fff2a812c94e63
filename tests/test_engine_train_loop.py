"""``engine/train_loop.py``: bfloat16/float16 autocast choice, one host sync per step for the
losses (after the backward, or queued before it with ``SOLVER.EARLY_LOSS_COPY``), the CUDA-graph
step mark."""
import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from model_helpers import ddl_cfg
from ddl_mask2former.engine import (
    DDLTrainLoop,
    NonFiniteLossError,
    NonFiniteLossHook,
    PendingHostLosses,
    amp_dtype_from_cfg,
    losses_to_host,
)


class _TermsModel(nn.Module):
    """A linear layer whose loss dict has many terms (as deep supervision gives); records the
    dtype its matmul ran in, to show which autocast was active."""

    def __init__(self, terms=12, nan_at_call=None):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.terms = terms
        self.nan_at_call = nan_at_call
        self.calls = 0
        self.seen_dtypes = []

    def forward(self, batch):
        out = self.linear(batch)
        self.seen_dtypes.append(out.dtype)
        self.calls += 1
        losses = {f"loss_{i}": (out.float() * (i + 1)).pow(2).mean() for i in range(self.terms)}
        if self.nan_at_call is not None and self.calls - 1 == self.nan_at_call:
            losses["loss_3"] = losses["loss_3"] * float("nan")
        return losses


def _batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(8, 4, generator=generator)


def test_amp_precision_key_picks_the_autocast_dtype():
    assert ddl_cfg().SOLVER.AMP.PRECISION == "float16"  # today's behaviour stays the default
    assert amp_dtype_from_cfg(ddl_cfg(**{"SOLVER.AMP.ENABLED": False})) is None
    assert amp_dtype_from_cfg(ddl_cfg(**{"SOLVER.AMP.ENABLED": True, "MODEL.DEVICE": "cuda"})) == torch.float16
    assert amp_dtype_from_cfg(ddl_cfg(**{"SOLVER.AMP.ENABLED": True, "MODEL.DEVICE": "cuda",
                                      "SOLVER.AMP.PRECISION": "bfloat16"})) == torch.bfloat16
    # float16 autocast is CUDA-only (ignored with a warning); bfloat16 also runs on CPUs.
    assert amp_dtype_from_cfg(ddl_cfg(**{"SOLVER.AMP.ENABLED": True, "MODEL.DEVICE": "cpu"})) is None
    assert amp_dtype_from_cfg(ddl_cfg(**{"SOLVER.AMP.ENABLED": True, "MODEL.DEVICE": "cpu",
                                      "SOLVER.AMP.PRECISION": "bfloat16"})) == torch.bfloat16
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        amp_dtype_from_cfg(ddl_cfg(**{"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.PRECISION": "fp8"}))


def test_losses_to_host_copies_once(monkeypatch):
    losses = {f"loss_{i}": torch.tensor(float(i), requires_grad=True) * 2 for i in range(30)}
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    host = losses_to_host(losses)
    assert calls == [(30,)]
    assert list(host) == list(losses)
    assert [float(v) for v in host.values()] == [2.0 * i for i in range(30)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the copy goes to pinned memory")
def test_pending_host_losses_on_a_gpu_equal_the_values_and_wait_only_for_them():
    values = torch.arange(31, dtype=torch.float32, device="cuda")
    losses = {f"loss_{i}": values[i] * 2 for i in range(31)}
    pending = PendingHostLosses(losses)
    later = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):  # work queued after the copy, as the backward is
        later = later @ later / 2048
    host = pending.result()
    assert list(host) == list(losses)
    assert [float(v) for v in host.values()] == [2.0 * i for i in range(31)]
    assert all(v.device.type == "cpu" for v in host.values())


@pytest.mark.parametrize("early_loss_copy", [False, True])
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_train_loop_logs_every_term_from_one_copy(amp_dtype, early_loss_copy, monkeypatch):
    """After the backward (default) or queued before it (SOLVER.EARLY_LOSS_COPY): one copy."""
    torch.manual_seed(0)
    model = _TermsModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loop = DDLTrainLoop(model, _batches(), optimizer, amp_dtype=amp_dtype, device_type="cpu",
                        early_loss_copy=early_loss_copy)
    assert loop.grad_scaler is None  # bfloat16 needs no loss scaling
    syncs = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: syncs.append(self.device) or real_item(self))
    with EventStorage(0) as storage:
        loop.storage = storage
        for loop.iter in range(3):
            storage.iter = loop.iter
            loop.run_step()
    assert model.seen_dtypes == [amp_dtype or torch.float32] * 3
    history = storage.histories()
    assert len(history["loss_7"].values()) == 3
    assert history["total_loss"].latest() == pytest.approx(sum(float(v) for v in loop.host_losses.values()))
    # detectron2's write_metrics still calls .item() per term, but on host tensors only.
    assert syncs and all(device.type == "cpu" for device in syncs)


@pytest.mark.parametrize("mark", [False, True])
def test_train_loop_marks_cuda_graph_steps_only_when_asked(mark, monkeypatch):
    """torch.compiler.cudagraph_mark_step_begin runs once per step only with
    mark_cudagraph_steps (set by the Trainer for SOLVER.COMPILE.MODE reduce-overhead)."""
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    model = _TermsModel()
    loop = DDLTrainLoop(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.01), device_type="cpu",
                        mark_cudagraph_steps=mark)
    with EventStorage(0) as storage:
        loop.storage = storage
        for loop.iter in range(2):
            loop.run_step()
    assert len(calls) == (2 if mark else 0)


def test_train_loop_bfloat16_gradients_match_full_precision():
    results = {}
    for amp_dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = _TermsModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loop = DDLTrainLoop(model, _batches(), optimizer, amp_dtype=amp_dtype, device_type="cpu")
        with EventStorage(0) as storage:
            loop.storage = storage
            loop.iter = 0
            loop.run_step()
        results[amp_dtype] = model.linear.weight.grad.clone()  # zero_grad runs before the backward
    reference, bf16 = results[None], results[torch.bfloat16]
    assert (bf16 - reference).abs().max() <= 0.02 * reference.abs().max()


def test_non_finite_hook_reads_the_loops_host_losses():
    model = _TermsModel(nan_at_call=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loop = DDLTrainLoop(model, _batches(), optimizer, amp_dtype=torch.bfloat16, device_type="cpu")
    hook = NonFiniteLossHook(model)
    loop.register_hooks([hook])
    with pytest.raises(NonFiniteLossError) as excinfo:
        loop.train(0, 10)
    message = str(excinfo.value)
    assert "iteration 2" in message and "loss_3=nan <-- non-finite" in message and "loss_11=" in message
    assert torch.isfinite(model.linear.weight).all()


def test_float16_loop_on_cpu_uses_a_grad_scaler_state():
    loop = DDLTrainLoop(_TermsModel(), _batches(), torch.optim.SGD(_TermsModel().parameters(), lr=0.1),
                        amp_dtype=torch.float16, device_type="cpu")
    assert loop.grad_scaler is not None
    assert "grad_scaler" in loop.state_dict()


def test_float16_loop_clips_unscaled_gradients_with_a_fused_optimizer(monkeypatch):
    """The clip runs inside optimizer.step(); a fused AdamW unscales inside its kernel, so the
    loop unscales first: the clip must see the true gradient norm, not 65536 times it."""
    from ddl_mask2former.engine import optimizer as optimizer_module

    seen = []
    clip = optimizer_module._CLIPPERS["full_model"]
    monkeypatch.setitem(optimizer_module._CLIPPERS, "full_model", lambda params, value, norm_type: (
        seen.append(torch.stack([p.grad.norm() for p in params]).norm().item()), clip(params, value, norm_type)))
    model = _TermsModel(terms=1)
    clipped = optimizer_module.with_gradient_clipping(torch.optim.AdamW, "full_model", clip_value=0.01)
    optimizer = clipped(model.parameters(), lr=1e-3, fused=True)
    loop = DDLTrainLoop(model, _batches(), optimizer, amp_dtype=torch.float16, device_type="cpu")
    with EventStorage(0) as storage:
        loop.storage = storage
        loop.iter = 0
        loop.run_step()
    batch = next(_batches())
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(batch)["loss_0"]
    loss.backward()
    true_norm = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
    assert loop.grad_scaler.get_scale() > 1000
    assert seen and seen[0] < 10 * true_norm + 1.0
