"""The compiled op was built by `pip install -e .` wherever nvcc and a CUDA torch are present.

No GPU needed: the module loads and its functions reject CPU tensors with a Python exception.
"""
import importlib
import os
import shutil

import pytest
import torch

from ddl_mask2former.ops import compiled_op_available
from ops_helpers import make_inputs


def _cuda_toolchain_reason():
    """Why the extension is not expected here, or None when it must have been built."""
    if os.environ.get("DDL_SKIP_CUDA_EXT", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "DDL_SKIP_CUDA_EXT is set, the CUDA op was deliberately not built"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    cuda_home = os.environ.get("CUDA_HOME")
    if shutil.which("nvcc") is None and not (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))):
        return "nvcc is not available, the CUDA op cannot be built here"
    return None


def _extension_or_skip():
    reason = _cuda_toolchain_reason()
    if reason is not None:
        pytest.skip(reason)
    if not compiled_op_available():
        pytest.fail("nvcc and a CUDA build of torch are present but ddl_mask2former.ops._C was not built: "
                    "run `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)")
    return importlib.import_module("ddl_mask2former.ops._C")


def test_extension_was_built_and_exports_the_kernels():
    extension = _extension_or_skip()
    assert callable(extension.ms_deform_attn_forward)
    assert callable(extension.ms_deform_attn_backward)


def test_extension_raises_python_errors_for_cpu_tensors():
    extension = _extension_or_skip()
    inputs = make_inputs()
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        extension.ms_deform_attn_forward(*inputs)
    grad_output = torch.zeros(2, 5, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        extension.ms_deform_attn_backward(*inputs, grad_output)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        extension.ms_deform_attn_forward(*inputs, channels_per_thread=1)
