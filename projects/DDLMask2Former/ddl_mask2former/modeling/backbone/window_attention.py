"""Swin window attention that keeps q, k and v for the backward, not the attention probabilities.

timm's written-out window attention, ``softmax(q k^T * scale + bias [+ shift mask]) @ v``,
leaves autograd holding the probabilities twice: in float32 (softmax's output, for its
derivative) and, under autocast, as the bfloat16 copy multiplied with v. Per token that is
``6 bytes x heads x 49`` against ``3 x channels x 2 bytes`` for q, k and v: 1.5x the q/k/v
of the block, the largest activations a Swin block saves. This function saves q, k, v (views of
one qkv output) and the position bias, and recomputes the probabilities in the backward: one
extra ``q k^T`` and softmax per block, the same operations on the same values, so the same
gradients.

It runs exactly the operations timm runs, in the dtypes autocast would give them: the logits
are ``q * scale @ k^T`` in the autocast dtype, plus the float32 position bias and shift mask
(float32 by promotion), softmax in float32, the probabilities cast back for ``@ v``. The
backward is written out so that ``torch.compile`` traces it without a graph break.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..precision import autocast_dtype, float32_region

__all__ = ["window_attention", "recompute_attention_in_backward"]


def _operands(q, k, v, scale, compute_dtype):
    """``q * scale``, k and v as the matmuls see them (autocast casts a matmul's operands)."""
    scaled = q * scale
    if compute_dtype is None:
        return scaled, k, v
    return scaled.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)


def _probabilities(scaled, keys, bias, mask, compute_dtype):
    """timm's attention weights (B_, heads, N, N) and the dtype of the logits (float32 when the
    bias is). CUDA's autocast runs softmax in float32; the CPU's leaves it in its input's dtype."""
    logits = scaled @ keys.transpose(-2, -1)
    logits = logits + bias
    if mask is not None:
        num_windows, tokens = mask.shape[0], logits.shape[-1]
        logits = logits.view(-1, num_windows, logits.shape[1], tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        logits = logits.view(-1, logits.shape[2], tokens, tokens)
    softmax_dtype = torch.float32 if compute_dtype is not None and logits.is_cuda else logits.dtype
    return logits.softmax(-1, dtype=softmax_dtype), logits.dtype


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale):
        device_type = q.device.type
        compute_dtype = autocast_dtype(device_type)
        with float32_region(device_type):
            scaled, keys, values = _operands(q, k, v, scale, compute_dtype)
            probs, ctx.logits_dtype = _probabilities(scaled, keys, bias, mask, compute_dtype)
            output = probs.to(values.dtype) @ values
        ctx.scale, ctx.compute_dtype = scale, compute_dtype
        ctx.save_for_backward(q, k, v, bias, mask)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        q, k, v, bias, mask = ctx.saved_tensors
        with float32_region(q.device.type):
            # Recomputed exactly as in the forward.
            scaled, keys, values = _operands(q, k, v, ctx.scale, ctx.compute_dtype)
            probs, _ = _probabilities(scaled, keys, bias, mask, ctx.compute_dtype)
            grad_output = grad_output.to(values.dtype)
            grad_v = (probs.to(values.dtype).transpose(-2, -1) @ grad_output).to(v.dtype)
            grad_probs = (grad_output @ values.transpose(-2, -1)).to(probs.dtype)
            grad_logits = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).to(ctx.logits_dtype)
            grad_bias = grad_logits.sum(0, keepdim=True).to(bias.dtype) if ctx.needs_input_grad[3] else None
            grad_scores = grad_logits.to(scaled.dtype)
            grad_q = (grad_scores @ keys).to(q.dtype) * ctx.scale
            grad_k = (grad_scores.transpose(-2, -1) @ scaled).to(k.dtype)
        return grad_q, grad_k, grad_v, grad_bias, None, None


def window_attention(q, k, v, bias, mask=None, scale=1.0):
    """``softmax(q * scale @ k^T + bias [+ mask]) @ v`` keeping q, k, v and the bias (not the
    probabilities) for the backward. q, k, v: (B_, heads, N, d); bias: (1, heads, N, N);
    mask: (num_windows, N, N) added to every batch's windows, or None. The mask gets no gradient."""
    return _WindowAttention.apply(q, k, v, bias, mask, scale)


def recompute_attention_in_backward(attention: nn.Module) -> bool:
    """Make a timm ``WindowAttention`` compute its written-out attention through
    :func:`window_attention`. Parameters and state-dict keys are untouched. Returns False (and
    leaves the module as it is) when the module lacks the pieces that path uses. timm's own
    forward still runs without autograd (inference), with ``fused_attn`` on (its fused path keeps
    no probabilities either) and while attention dropout is active."""
    names = ("qkv", "proj", "proj_drop", "attn_drop", "softmax", "num_heads", "scale", "_get_rel_pos_bias")
    if not (all(hasattr(attention, name) for name in names)
            and isinstance(attention.qkv, nn.Linear) and isinstance(attention.proj, nn.Linear)
            and isinstance(attention.softmax, nn.Softmax) and attention.softmax.dim in (-1, 3)
            and isinstance(attention.attn_drop, nn.Dropout)):
        return False
    original = attention.forward

    def forward(self, x, mask=None):
        if (not torch.is_grad_enabled() or getattr(self, "fused_attn", False)
                or (self.training and self.attn_drop.p > 0)):
            return original(x, mask)
        batch_windows, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch_windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = window_attention(q, k, v, self._get_rel_pos_bias(), mask, self.scale)
        x = x.transpose(1, 2).reshape(batch_windows, tokens, -1)
        return self.proj_drop(self.proj(x))

    attention.forward = types.MethodType(forward, attention)
    return True
