"""The precision policy: which parts run in autocast's low-precision dtype and which in float32.

Training runs under ``torch.autocast`` when ``SOLVER.AMP.ENABLED`` (``AMP_PRECISIONS``: float16
with a GradScaler, CUDA only, or bfloat16; ``engine.amp_dtype_from_cfg`` reads the keys), and
autocast picks each operator's dtype, except in these float32 regions (``float32_region``):

* the localization losses and their matching (``criterion.py``) and the detection BCE
  (``meta_arch.py``): only the matched masks and the logits are cast, never all queries' masks;
* the fixed noise-residual filters (``noise_residuals.py``): in bfloat16 their taps round and stop
  summing to zero;
* the functions that run their operations themselves below autocast (the recomputed GELU, window
  attention and encoder FFN) compute in ``autocast_dtype``, what autocast would give a matmul;
  the CUDA-graph runner replays the caller's autocast (``autocast_region``).

The deformable-attention layer (``ops/ms_deform_attn.py``) keeps its sampling in float32, and its
projections too with ``MODEL.DDL.PIXEL_DECODER.FP32_PROJECTIONS`` (default); ``ops`` imports with
torch alone, so it applies that rule itself.
"""
import torch

__all__ = ["AMP_PRECISIONS", "autocast_dtype", "autocast_region", "float32_region"]

# SOLVER.AMP.PRECISION -> autocast dtype.
AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype(device_type):
    """Autocast's low-precision dtype on ``device_type`` ("cuda", "cpu"), or None when autocast
    is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_region(device_type, dtype, **kwargs):
    """Autocast to ``dtype`` on ``device_type``; ``dtype`` None runs in full precision."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None, **kwargs)


def float32_region(device_type):
    """A region outside autocast: operations keep their inputs' dtypes (cast them to float32)."""
    return torch.autocast(device_type, enabled=False)
