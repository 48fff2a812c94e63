#!/usr/bin/env bash
# One-shot GPU check of the multi-scale deformable attention op (needs no detectron2):
# build the CUDA extension in place, run the ops tests, run the benchmark, log everything.
#   OUT=/some/dir benchmarks/gpu_check.sh        (run from anywhere; default OUT=/tmp/ddl_gpu_check)
#   PYTHON=python3 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 are the defaults here.
# Exit status: number of failed steps (0 = all passed).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/ddl_gpu_check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1

PYTHON="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$ROOT/projects/DDLMask2Former${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset DDL_MSDA_FORCE_PYTORCH DDL_SKIP_CUDA_EXT
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

FAILED=0
step() {
  local name="$1"; shift
  echo
  echo "===== $name: $* ($(date -u +%H:%M:%S))"
  local start=$SECONDS
  "$@"
  local status=$?
  echo "===== $name: exit $status after $((SECONDS - start)) s"
  [ "$status" -eq 0 ] || FAILED=$((FAILED + 1))
  return "$status"
}

step environment bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  command -v nvcc && nvcc --version | tail -1; \
  $PYTHON -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")'"

# Stale in-place builds for another Python or torch must not be picked up.
rm -rf "$ROOT/build" "$ROOT"/projects/DDLMask2Former/ddl_mask2former/ops/_C*.so
step build "$PYTHON" setup.py build_ext --inplace || { echo "build failed: skipping the GPU tests"; }

step import "$PYTHON" -c "import sys, ddl_mask2former.ops as ops; print('compiled op available:', ops.compiled_op_available()); \
assert 'detectron2' not in sys.modules, 'ddl_mask2former.ops imported detectron2'"

# --noconftest: the ops tests need no shared fixtures, and a conftest must not pull in detectron2.
# The error-path test runs in its own process so a crash there cannot hide the other results.
PYTEST=("$PYTHON" -m pytest -v --noconftest -p no:cacheprovider)
step tests "${PYTEST[@]}" tests/test_ops_pytorch.py tests/test_ops_module.py tests/test_ops_extension.py \
  tests/test_ops_cuda.py -k "not test_kernel_errors_are_python_exceptions"
step error_tests "${PYTEST[@]}" tests/test_ops_cuda.py -k test_kernel_errors_are_python_exceptions

step bench_fp32 "$PYTHON" benchmarks/bench_msda.py --json "$OUT/bench_fp32.json"
step bench_fp16 "$PYTHON" benchmarks/bench_msda.py --dtype float16 --json "$OUT/bench_fp16.json"

# Out-of-bounds and race checks of the kernels on a small case (best effort, time-capped).
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$PYTHON" -m pytest -q \
    --noconftest -p no:cacheprovider tests/test_ops_cuda.py -k "matches_pytorch and float64"
fi

echo
echo "===== gpu_check done: $FAILED failed step(s); log in $OUT/log"
exit "$FAILED"
