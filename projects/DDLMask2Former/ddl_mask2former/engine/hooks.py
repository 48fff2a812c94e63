"""Training hooks specific to DDL-Mask2Former."""
import math

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

__all__ = ["NonFiniteLossError", "NonFiniteLossHook"]


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss becomes NaN or infinite."""


class NonFiniteLossHook(HookBase):
    """Stop training, before the optimizer step, when any loss term is NaN or infinite.

    The hook watches the model's training outputs through a forward hook (the loss dict
    never reaches trainer hooks otherwise) and checks them in ``after_backward``, which
    runs before ``optimizer.step()``: the weights stay finite and the last checkpoint stays
    usable. In multi-process runs the verdict is all-reduced, so every process stops at the
    same iteration instead of the healthy ones waiting forever in the next all-reduce.

    Register it on the object whose ``run_step`` calls ``after_backward`` (detectron2's
    ``SimpleTrainer`` / ``AMPTrainer``), e.g. ``trainer._trainer.register_hooks([hook])``.
    """

    def __init__(self, model: nn.Module):
        self._loss_dict = None
        self._handle = model.register_forward_hook(self._capture_losses)

    def _capture_losses(self, module, inputs, output):
        if module.training and isinstance(output, dict):
            self._loss_dict = output

    def remove(self):
        """Detach the forward hook from the model."""
        self._handle.remove()

    def after_backward(self):
        loss_dict, self._loss_dict = self._loss_dict, None
        # DDLTrainLoop has already copied this step's losses to the host (one sync for all).
        host_losses = getattr(self.trainer, "host_losses", None)
        if host_losses is not None:
            values = {name: float(value) for name, value in host_losses.items()}
        elif loss_dict is None:
            return
        else:
            stacked = torch.stack([value.detach().float().sum() for value in loss_dict.values()]).tolist()
            values = dict(zip(loss_dict.keys(), stacked))
        local_bad = not all(math.isfinite(v) for v in values.values())
        if comm.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([1.0 if local_bad else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() == 0.0:
                return
            per_rank = comm.all_gather(values)
        elif not local_bad:
            return
        else:
            per_rank = [values]
        raise NonFiniteLossError(self._message(self.trainer.iter, per_rank))

    @staticmethod
    def _message(iteration, per_rank):
        lines = [f"Non-finite loss at iteration {iteration}; training stopped before the "
                 "optimizer step. Loss terms:"]
        for rank, values in enumerate(per_rank):
            prefix = f"  rank {rank}: " if len(per_rank) > 1 else "  "
            terms = ", ".join(
                f"{name}={value:.6g}" + ("" if math.isfinite(value) else " <-- non-finite")
                for name, value in sorted(values.items())
            )
            lines.append(prefix + terms)
        lines.append("Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or check the inputs "
                     "of that iteration; --resume restarts from the last checkpoint.")
        return "\n".join(lines)
