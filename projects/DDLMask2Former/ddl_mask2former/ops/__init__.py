"""Multi-scale deformable attention: Python API, PyTorch path, and the compiled CUDA op.

Imports with torch alone; the compiled ``ddl_mask2former.ops._C`` is optional and used
automatically for CUDA tensors when it was built (see ``ms_deform_attn_func``).
"""
from .ms_deform_attn import MSDeformAttn
from .ms_deform_attn_func import (
    FORCE_PYTORCH_ENV,
    compiled_op_available,
    force_pytorch_requested,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)
from .registered_op import ms_deform_attn_backward_op, ms_deform_attn_op

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "compiled_op_available",
    "force_pytorch_requested",
    "FORCE_PYTORCH_ENV",
    "ms_deform_attn_op",
    "ms_deform_attn_backward_op",
]
