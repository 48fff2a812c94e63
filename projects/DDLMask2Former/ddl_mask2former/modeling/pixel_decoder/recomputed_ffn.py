"""``linear2(relu(linear1(x)))`` that keeps only ``x`` for the backward: the hidden is recomputed.

In the deformable encoder's FFN autograd keeps the ReLU's output (the 1024-wide hidden; ReLU
needs it for its derivative, ``linear2`` for its weight gradient: one tensor for both), four
times the 256-wide input, which ``linear1`` keeps anyway. At batch 16 and 512 px the six
layers' hiddens are ~1 GiB on a GPU, the encoder's largest activation
(``benchmarks/bench_gpu_memory_estimate.py --depth 4``). This function keeps the input alone and
runs ``linear1`` and the ReLU again in the backward: one more matmul per layer (a twelfth of the
encoder layer's forward work), the same operations on the same values for the gradients.

Under autocast it does what autocast would do for the two ``F.linear`` calls (input, weights
and biases in the autocast dtype, output in that dtype); gradients come back in each input's
own dtype, as autocast's casts give them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..precision import autocast_dtype, float32_region

__all__ = ["relu_ffn"]


def _cast(tensors, dtype):
    return [t if t is None or dtype is None else t.to(dtype) for t in tensors]


class _ReluFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2):
        device_type = x.device.type
        compute_dtype = autocast_dtype(device_type)
        ctx.dtypes = [None if t is None else t.dtype for t in (x, weight1, bias1, weight2, bias2)]
        ctx.compute_dtype = compute_dtype
        xc, w1, b1, w2, b2 = _cast((x, weight1, bias1, weight2, bias2), compute_dtype)
        with float32_region(device_type):
            output = F.linear(F.relu(F.linear(xc, w1, b1)), w2, b2)
        ctx.save_for_backward(xc, weight1, bias1, weight2)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        xc, weight1, bias1, weight2 = ctx.saved_tensors
        x_dtype, w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.dtypes
        w1, b1, w2 = _cast((weight1, bias1, weight2), ctx.compute_dtype)
        needs = ctx.needs_input_grad
        with float32_region(xc.device.type):
            hidden = F.relu(F.linear(xc, w1, b1))  # recomputed: not kept from the forward
            grad_output = grad_output.to(w2.dtype)
            flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
            grad_w2 = (flat_grad.t() @ hidden.reshape(-1, hidden.shape[-1])).to(w2_dtype) if needs[3] else None
            grad_b2 = flat_grad.sum(0).to(b2_dtype) if b2_dtype is not None and needs[4] else None
            grad_x = grad_w1 = grad_b1 = None
            if needs[0] or needs[1] or needs[2]:
                grad_hidden = torch.ops.aten.threshold_backward(grad_output @ w2, hidden, 0)
                flat_hidden_grad = grad_hidden.reshape(-1, grad_hidden.shape[-1])
                if needs[0]:
                    grad_x = (grad_hidden @ w1).to(x_dtype)
                if needs[1]:
                    grad_w1 = (flat_hidden_grad.t() @ xc.reshape(-1, xc.shape[-1])).to(w1_dtype)
                if b1_dtype is not None and needs[2]:
                    grad_b1 = flat_hidden_grad.sum(0).to(b1_dtype)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def relu_ffn(x, linear1, linear2):
    """``linear2(relu(linear1(x)))`` for two ``nn.Linear`` layers, keeping only ``x`` (in the
    autocast dtype, as ``linear1`` would) and the weights for the backward."""
    return _ReluFFN.apply(x, linear1.weight, linear1.bias, linear2.weight, linear2.bias)
