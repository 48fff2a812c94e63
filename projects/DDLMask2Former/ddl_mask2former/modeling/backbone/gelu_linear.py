"""``fc2(gelu(h))`` that keeps only ``h`` for the backward: the activation is recomputed.

In a transformer MLP (``fc1 -> GELU -> fc2``) autograd normally keeps two hidden-size tensors
per block: GELU's input ``h`` (for its derivative) and its output ``gelu(h)`` (for fc2's weight
gradient). Both are 4x the token width, the largest activations Swin saves. GELU is one cheap
elementwise pass, so this function keeps ``h`` alone and recomputes ``gelu(h)`` in the backward:
the saved activations of the MLP halve, the gradients are the same operations on the same
values, and the extra work is one elementwise pass per block.

Under autocast the function does what autocast would do for ``F.linear`` (inputs, weight and
bias in the autocast dtype; GELU in the hidden's dtype) and returns the same dtype.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import autocast_dtype, float32_region

__all__ = ["gelu_linear", "recompute_gelu_in_backward"]


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias):
        device_type = hidden.device.type
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        dtype = autocast_dtype(device_type)
        if dtype is not None:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with float32_region(device_type):
            output = F.linear(F.gelu(hidden), weight, bias)
        ctx.save_for_backward(hidden, weight)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hidden, weight = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_output = grad_output.to(weight.dtype)
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.ops.aten.gelu_backward(grad_output @ weight, hidden).to(hidden_dtype)
        if ctx.needs_input_grad[1]:
            activated = F.gelu(hidden)  # recomputed: not kept from the forward
            grad_weight = (flat_grad.t() @ activated.reshape(-1, activated.shape[-1])).to(weight_dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias


def gelu_linear(hidden, weight, bias=None):
    """``F.linear(F.gelu(hidden), weight, bias)`` keeping only ``hidden`` (and the weight) for
    the backward. Exact GELU (``approximate="none"``)."""
    return _GeluLinear.apply(hidden, weight, bias)


def recompute_gelu_in_backward(mlp: nn.Module) -> bool:
    """Make a timm ``Mlp`` (fc1, act, drop1, norm, fc2, drop2) run ``fc2(gelu(.))`` through
    :func:`gelu_linear`. Parameters and state-dict keys are untouched. Returns False (and
    leaves the module as it is) when its layers are not exactly that: a GELU other than the
    exact one, a norm between the two linears, or a convolutional MLP. With dropout after the
    activation the original path runs whenever that dropout is active (training, p > 0)."""
    act = getattr(mlp, "act", None)
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not (isinstance(act, nn.GELU) and act.approximate == "none"
            and isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
            and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
            and isinstance(getattr(mlp, "drop1", None), nn.Dropout)
            and isinstance(getattr(mlp, "drop2", None), nn.Dropout)):
        return False
    original = mlp.forward

    def forward(self, x):
        if not torch.is_grad_enabled() or (self.training and self.drop1.p > 0):
            return original(x)
        return self.drop2(gelu_linear(self.fc1(x), self.fc2.weight, self.fc2.bias))

    mlp.forward = types.MethodType(forward, mlp)
    return True
