#!/usr/bin/env bash
# One-shot GPU check, <= 8 minutes on one H100: build the multi-scale deformable attention op in
# place, run the ops tests, then the whole-model throughput benchmarks of issue 10 (ours vs
# Hugging Face Mask2Former, tools/train_net.py images/s, the quickstart model's it/s), logging
# everything under $OUT. Steps that need detectron2 or transformers use the wheels carried in
# .gpu-wheels/ (fill it here first with benchmarks/fetch_gpu_wheels.sh); without them those steps
# fail and the others still run.
#
# Device tool call (the repository root is the working directory there):
#   command: OUT=$OUT bash benchmarks/gpu_check.sh
#   carry:   [".gpu-wheels"]
#   timeout_s: 560
# Locally: OUT=/some/dir benchmarks/gpu_check.sh   (default OUT=/tmp/ddl_gpu_check)
#   PYTHON=python3 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 are the defaults here.
#   DDL_GPU_CHECK_SKIP_BUILD=1 keeps an existing build; DDL_GPU_CHECK_SMALL=1 runs the model
#   benchmarks as tiny CPU smoke tests (both for trying the script on a machine without a GPU).
#   DDL_GPU_CHECK_BUDGET_S=450: optional steps (compiled-backbone variant, ops float16 benchmark,
#   compute-sanitizer) start only while this many seconds since the start are not yet used up.
# Results: $OUT/log, throughput.json, train_net.json, bench_fp32.json, bench_fp16.json,
#   throughput_compiled.json (at most 8 files come back from the device tool).
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

BUDGET_S="${DDL_GPU_CHECK_BUDGET_S:-450}"
# have_time SECONDS: true when a step expected to take SECONDS still fits in the budget.
have_time() { [ $((SECONDS + $1)) -le "$BUDGET_S" ] || { echo "===== skipped (time budget): $2"; return 1; }; }

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
if [ "${DDL_GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  echo "===== build skipped (DDL_GPU_CHECK_SKIP_BUILD=1)"
else
  rm -rf "$ROOT/build" "$ROOT"/projects/DDLMask2Former/ddl_mask2former/ops/_C*.so
  step build "$PYTHON" setup.py build_ext --inplace || { echo "build failed: skipping the GPU tests"; }
fi

step import "$PYTHON" -c "import sys, ddl_mask2former.ops as ops; print('compiled op available:', ops.compiled_op_available()); \
assert 'detectron2' not in sys.modules, 'ddl_mask2former.ops imported detectron2'"

# After the import check (ops must import without detectron2): detectron2 and its pure-Python dependencies (and transformers when the machine's own does not
# import) from the carried wheels, into a scratch folder that PYTHONPATH appends.
if [ -d "$ROOT/.gpu-wheels" ]; then
  SITE=/tmp/ddl_gpu_site
  wheels=("$ROOT"/.gpu-wheels/*.whl)
  "$PYTHON" -c "import transformers" 2>/dev/null || wheels+=("$ROOT"/.gpu-wheels/optional/*.whl)
  step wheels "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$PYTHONPATH:$SITE"
else
  echo "no .gpu-wheels/ carried: the whole-model steps need detectron2 (benchmarks/fetch_gpu_wheels.sh)"
fi

# --noconftest: the ops tests need no shared fixtures, and a conftest must not pull in detectron2.
# The error-path test runs in its own process so a crash there cannot hide the other results.
PYTEST=("$PYTHON" -m pytest -v --noconftest -p no:cacheprovider)
step tests "${PYTEST[@]}" tests/test_ops_pytorch.py tests/test_ops_module.py tests/test_ops_extension.py \
  tests/test_ops_cuda.py -k "not test_kernel_errors_are_python_exceptions"
step error_tests "${PYTEST[@]}" tests/test_ops_cuda.py -k test_kernel_errors_are_python_exceptions

# Issue 10: ours vs HF Mask2Former (training step batch 16, inference batch 1 and 16, bf16
# autocast), the quickstart model at batch 32, host syncs per step; then train_net.py images/s.
# DDL_GPU_CHECK_SMALL=1 runs these as CPU smoke tests (tiny models), to try the script without a GPU.
if [ "${DDL_GPU_CHECK_SMALL:-0}" = 1 ]; then SMALL=(--device cpu --small); TN_ARGS=(--small); else SMALL=(); TN_ARGS=(--batch 32 --iters 50); fi
step throughput timeout 300 "$PYTHON" benchmarks/bench_gpu_throughput.py "${SMALL[@]}" --json "$OUT/throughput.json"
step train_net timeout 240 "$PYTHON" benchmarks/bench_train_net.py "${TN_ARGS[@]}" --json "$OUT/train_net.json"
# Model tests use tests/conftest.py (so no --noconftest); on CUDA they add the GPU cases.
step model_tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_throughput_engine.py \
  tests/test_throughput_model.py

# Issue 9: the quickstart model on the hardest synthetic level, at most TRAIN_SECONDS of training.
if [ "${DDL_GPU_CHECK_SMALL:-0}" = 1 ]; then
  QS_ENV=(NUM_TRAIN=8 NUM_VAL=4 ITERS=4 EVAL_PERIOD=2 BATCH=2 WORKERS=1 TRAIN_SECONDS=240 DEVICE=cpu)
else
  QS_ENV=(TRAIN_SECONDS="${DDL_GPU_QUICKSTART_SECONDS:-240}")
fi
step quickstart_gpu env "${QS_ENV[@]}" OUT="$OUT" PYTHON="$PYTHON" bash benchmarks/gpu_quickstart.sh

# ===== optional steps, while the time budget lasts
have_time 60 bench_fp32 && step bench_fp32 "$PYTHON" benchmarks/bench_msda.py --json "$OUT/bench_fp32.json"
have_time 60 bench_fp16 && step bench_fp16 "$PYTHON" benchmarks/bench_msda.py --dtype float16 \
  --json "$OUT/bench_fp16.json"
# torch.compile'd backbone (SOLVER.COMPILE.MODULES ["backbone"]); compiling takes a minute or more.
have_time 150 compiled && step compiled timeout 150 "$PYTHON" benchmarks/bench_gpu_throughput.py "${SMALL[@]}" --skip-hf \
  --skip-quickstart --compile backbone --json "$OUT/throughput_compiled.json"

# Out-of-bounds and race checks of the kernels on a small case (best effort, time-capped).
if command -v compute-sanitizer >/dev/null 2>&1 && have_time 90 memcheck; then
  step memcheck timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$PYTHON" -m pytest -q \
    --noconftest -p no:cacheprovider tests/test_ops_cuda.py -k "matches_pytorch and float64"
fi

echo
echo "===== gpu_check done: $FAILED failed step(s); log in $OUT/log"
exit "$FAILED"
