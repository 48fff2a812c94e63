"""The inner training step: autocast in float16 (with a GradScaler) or bfloat16 (without),
and one host synchronization per step for the whole loss dict.

detectron2's ``SimpleTrainer`` / ``AMPTrainer`` log the losses with ``v.detach().cpu().item()``
per term: with deep supervision that is ~30 device round trips per step, each waiting for the
device. Here the loss terms are stacked and copied to the host once, after the backward (the
path measured on a GPU); the copy serves both the metrics and ``NonFiniteLossHook`` (which
would otherwise read every term again). Opt-in (``SOLVER.EARLY_LOSS_COPY``, not yet run on a
GPU): the copy is queued right after the forward and read after the backward has been launched
(``PendingHostLosses``), so the host waits for the forward only.
"""
import logging
import time

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm

from ..data.training_order import derived_seed, seed_random_state
from ..modeling.precision import AMP_PRECISIONS, autocast_region

__all__ = ["AMP_PRECISIONS", "DDLTrainLoop", "PendingHostLosses", "amp_dtype_from_cfg", "losses_to_host"]

logger = logging.getLogger(__name__)


def amp_dtype_from_cfg(cfg):
    """The autocast dtype SOLVER.AMP asks for on MODEL.DEVICE, or None for full precision.

    float16 needs CUDA (it is ignored with a warning elsewhere, as before); bfloat16 also runs
    on CPUs, whose autocast supports it.
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    precision = cfg.SOLVER.AMP.PRECISION
    if precision not in AMP_PRECISIONS:
        raise ValueError(f"SOLVER.AMP.PRECISION={precision!r} is not one of {sorted(AMP_PRECISIONS)}")
    device_type = torch.device(cfg.MODEL.DEVICE).type
    if precision == "float16" and device_type != "cuda":
        logger.warning("SOLVER.AMP.ENABLED with PRECISION float16 is ignored on MODEL.DEVICE=%s (CUDA only; "
                       "bfloat16 works there)", cfg.MODEL.DEVICE)
        return None
    return AMP_PRECISIONS[precision]


class PendingHostLosses:
    """The loss terms' copy to the host, queued when built (right after the forward).

    On a GPU the copy goes to pinned memory without waiting; ``result()`` then waits for that copy
    only, i.e. for the forward, while the backward launched in between keeps the GPU busy. (Read
    after the backward, as detectron2 does, the host would wait for the whole backward and the GPU
    would idle while the host launches the optimizer step and the next forward.)
    """

    def __init__(self, loss_dict):
        self.names = list(loss_dict)
        self._event = None
        self._values = None
        if not loss_dict:
            return
        stacked = torch.stack([value.detach().float().sum() for value in loss_dict.values()])
        if stacked.is_cuda:
            self._values = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self._values.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._values = stacked.cpu()

    def result(self):
        """{name: 0-dim CPU float32 tensor}."""
        if self._event is not None:
            self._event.synchronize()
        return {} if self._values is None else dict(zip(self.names, self._values.unbind()))


def losses_to_host(loss_dict):
    """{name: 0-dim CPU float32 tensor} from one stacked device-to-host copy (one sync)."""
    return PendingHostLosses(loss_dict).result()


class DDLTrainLoop(SimpleTrainer):
    """``SimpleTrainer`` with optional autocast and one host sync per step for the losses.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        amp_dtype: None (full precision), ``torch.float16`` (a GradScaler scales the loss) or
            ``torch.bfloat16`` (same exponent range as float32: no scaler, no skipped steps).
        device_type: autocast device type ("cuda" or "cpu").
        grad_scaler: for float16; built when None.
        early_loss_copy: queue the losses' host copy before the backward (``PendingHostLosses``)
            instead of copying them after it.
        mark_cudagraph_steps: start each step with ``torch.compiler.cudagraph_mark_step_begin``
            (CUDA-graph trees of ``SOLVER.COMPILE.MODE`` reduce-overhead).

    After the backward, ``self.host_losses`` holds the step's loss terms as CPU tensors
    (``NonFiniteLossHook`` reads them from there).
    """

    def __init__(self, model, data_loader, optimizer, *, amp_dtype=None, device_type="cuda", grad_scaler=None,
                 early_loss_copy=False, mark_cudagraph_steps=False, seed=None, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype}")
        if amp_dtype == torch.float16 and grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(device_type)
        self.amp_dtype = amp_dtype
        self.device_type = device_type
        self.grad_scaler = grad_scaler if amp_dtype == torch.float16 else None
        self.early_loss_copy = early_loss_copy
        self.mark_cudagraph_steps = mark_cudagraph_steps
        self.seed = seed
        self.host_losses = None

    def run_step(self):
        assert self.model.training, "[DDLTrainLoop] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.seed is not None:
            # The step's random draws (point sampling, drop path) from (seed, iteration, rank):
            # a resumed run makes the same ones as the uninterrupted run.
            seed_random_state(derived_seed(self.seed, self.iter, comm.get_rank()))

        if self.mark_cudagraph_steps:
            # A new step for CUDA-graph trees: the previous step's graph outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with autocast_region(self.device_type, self.amp_dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values())
        host_losses = PendingHostLosses(loss_dict) if self.early_loss_copy else None
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()

        self.host_losses = host_losses.result() if host_losses is not None else losses_to_host(loss_dict)
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, self.host_losses, data_time, iter=self.iter)
        else:
            self._write_metrics(self.host_losses, data_time)

        if self.grad_scaler is not None:
            # Gradient clipping runs inside optimizer.step(); a fused optimizer would otherwise get
            # the scaled gradients (it unscales them itself, after the clip).
            self.grad_scaler.unscale_(self.optimizer)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
