"""Install DDL-Mask2Former: ``pip install --no-build-isolation -e .``

The importable package lives in ``projects/DDLMask2Former/ddl_mask2former`` (detectron2
project layout), beside ``ddl_mask2former_serve`` (the torch-free runtime of exported models and
the ``ddl-mask2former`` command; ``pip install .[serve]`` installs only what it needs). The multi-scale deformable attention CUDA op is built here as
``ddl_mask2former.ops._C`` when nvcc and a CUDA build of torch are present; without them the
package installs without it and uses the PyTorch path.

Environment variables read here:
  FORCE_CUDA=1            build the CUDA op even when the checks below say no (fails loudly if
                          nvcc or a CUDA torch is missing). No visible GPU is ever needed.
  DDL_SKIP_CUDA_EXT=1     never build the CUDA op (fast installs, CI jobs that do not test it).
  CUDA_HOME               CUDA toolkit root; derived from nvcc's real location when unset.
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for; default "8.0;9.0+PTX" (A100, H100/H200,
                          and PTX that newer GPUs compile at load time).
  MAX_JOBS                parallel compile jobs (ninja).
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

PROJECT_DIR = "projects/DDLMask2Former"
OPS_DIR = os.path.join(PROJECT_DIR, "ddl_mask2former", "ops")
EXTENSION_NAME = "ddl_mask2former.ops._C"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _note(message):
    print(f"[ddl-mask2former setup] {message}", file=sys.stderr)


def _toolkit_root_from_nvcc(nvcc):
    """CUDA toolkit root for an nvcc on PATH, which may be a symlink or a wrapper script."""
    candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(candidate, "include", "cuda_runtime.h")):
        return candidate
    # A wrapper script (e.g. /usr/local/bin/nvcc exec-ing the real one): ask nvcc where it lives.
    with tempfile.TemporaryDirectory() as scratch:
        probe = os.path.join(scratch, "probe.cu")
        with open(probe, "w") as handle:
            handle.write("\n")
        result = subprocess.run([nvcc, "--dryrun", "-c", probe, "-o", os.path.join(scratch, "p.o")],
                                capture_output=True, text=True, check=False)
    match = re.search(r"^#\$ TOP=(.+)$", result.stderr + result.stdout, flags=re.MULTILINE)
    if match:
        root = os.path.realpath(match.group(1).strip())
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _find_cuda_home():
    """CUDA_HOME if set, else derived from nvcc; None when no toolkit is found."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        if not os.path.exists(nvcc):
            _note(f"CUDA_HOME={cuda_home} has no bin/nvcc")
            return None
        if os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
            return cuda_home
        # e.g. CUDA_HOME=/usr/local from /usr/local/bin/nvcc: compiles, then cannot find -lcudart.
        derived = _toolkit_root_from_nvcc(nvcc)
        _note(f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h; using {derived} from its nvcc")
        return derived
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    return _toolkit_root_from_nvcc(nvcc)


def _cuda_extensions():
    """([CUDAExtension], {"build_ext": BuildExtension}) or ([], {}) when the op is not built."""
    if _flag("DDL_SKIP_CUDA_EXT"):
        _note("DDL_SKIP_CUDA_EXT is set: not building the CUDA op (PyTorch path only)")
        return [], {}
    force = _flag("FORCE_CUDA")
    try:
        import torch
    except ImportError:
        if force:
            raise RuntimeError("FORCE_CUDA=1 but torch is not importable; install torch first and "
                               "use pip install --no-build-isolation") from None
        _note("torch is not importable in the build environment (use --no-build-isolation): "
              "not building the CUDA op")
        return [], {}
    cuda_home = _find_cuda_home()
    problems = []
    if cuda_home is None:
        problems.append("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if problems:
        if force:
            raise RuntimeError("FORCE_CUDA=1 but the CUDA op cannot be built: " + "; ".join(problems))
        _note("not building the CUDA op: " + "; ".join(problems) + " (PyTorch path only)")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, so set it first.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join(OPS_DIR, "csrc", "*.cpp"))
                     + glob.glob(os.path.join(OPS_DIR, "csrc", "*.cu")))
    _note(f"building {EXTENSION_NAME} with CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    extension = CUDAExtension(
        name=EXTENSION_NAME,
        sources=sources,
        include_dirs=[os.path.abspath(os.path.join(OPS_DIR, "csrc"))],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )
    return [extension], {"build_ext": BuildExtension}


def _requirements(name):
    """Requirement lines of requirements/<name> (comments and blank lines left out)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements", name)
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="ddl-mask2former",
    version="0.1.0",
    description="Joint deepfake detection and localization with a Mask2Former-style model",
    python_requires=">=3.10",
    package_dir={"": PROJECT_DIR},
    packages=find_packages(PROJECT_DIR),
    package_data={"ddl_mask2former.ops": ["csrc/*.h", "csrc/*.cpp", "csrc/*.cu"],
                  "ddl_mask2former_serve": ["page.html"]},
    # pip install -e .[deploy]: ONNX export and ONNX Runtime (requirements/deploy.txt).
    # pip install .[serve]: only what serving an exported ONNX model needs (no torch, no detectron2).
    extras_require={"deploy": _requirements("deploy.txt"), "serve": _requirements("serve.txt")},
    entry_points={"console_scripts": ["ddl-mask2former = ddl_mask2former_serve.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
