#!/usr/bin/env bash
# The quickstart model on one GPU: synthetic data of the HARDEST trace level (the level the CPU
# quickstart cannot learn in its budget), then configs/quickstart/ddl_mask2former_quickstart_swin.yaml
# trained by tools/train_net.py --num-gpus 1 for at most $TRAIN_SECONDS (default 270 s), with
# evaluations on the val split along the way; prints the val curve (AUC, F1, IoU per evaluation).
#   OUT=/dir bash benchmarks/gpu_quickstart.sh      (called by benchmarks/gpu_check.sh)
# Env: DIFFICULTY (hard), NUM_TRAIN (3000), NUM_VAL (200), ITERS (2000), BATCH (32),
#   EVAL_PERIOD (500), TRAIN_SECONDS (270), WORKERS (12), DEVICE (cuda), PYTHON (python3). Needs detectron2 and
#   scikit-image importable (gpu_check.sh installs the carried .gpu-wheels/ first).
# Writes $OUT/quickstart_gpu_metrics.json (detectron2's metrics.json) and, when matplotlib is
# there, $OUT/quickstart_gpu_curve.png; the run itself stays in /tmp/ddl_gpu_quickstart.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/ddl_gpu_check}"
PYTHON="${PYTHON:-python3}"
WORK=/tmp/ddl_gpu_quickstart
DIFFICULTY="${DIFFICULTY:-hard}"
ITERS="${ITERS:-2000}"
EVAL_PERIOD="${EVAL_PERIOD:-500}"
mkdir -p "$OUT" "$WORK"

if ! "$PYTHON" -c "import skimage" 2>/dev/null && [ -d "$ROOT/.gpu-wheels/quickstart" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ddl_gpu_site_qs \
    "$ROOT"/.gpu-wheels/quickstart/*.whl
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/ddl_gpu_site_qs"
fi

start=$SECONDS
"$PYTHON" datasets/make_synthetic_ddl.py --out "$WORK/DDL-I" --num-train "${NUM_TRAIN:-3000}" \
  --num-val "${NUM_VAL:-200}" --seed 0 --difficulty "$DIFFICULTY" --workers 16 || exit 1
echo "data: $((SECONDS - start)) s"

rm -rf "$WORK/run"
start=$SECONDS
DETECTRON2_DATASETS="$WORK" timeout "${TRAIN_SECONDS:-270}" "$PYTHON" tools/train_net.py \
  --config-file configs/quickstart/ddl_mask2former_quickstart_swin.yaml --num-gpus 1 \
  MODEL.DEVICE "${DEVICE:-cuda}" SOLVER.IMS_PER_BATCH "${BATCH:-32}" SOLVER.MAX_ITER "$ITERS" \
  TEST.EVAL_PERIOD "$EVAL_PERIOD" DATALOADER.NUM_WORKERS "${WORKERS:-12}" SOLVER.CHECKPOINT_PERIOD 100000 \
  OUTPUT_DIR "$WORK/run" > "$WORK/train.log" 2>&1
status=$?
echo "training: exit $status after $((SECONDS - start)) s (124 = stopped at the time limit); log $WORK/train.log"
grep -E "eta:|copypaste: [0-9]|Traceback|Error" "$WORK/train.log" | grep -vE "^\s*$" | \
  awk '/eta:/ { n++; if (n % 10) next } { print }' | cut -c1-160 | tail -40
cp "$WORK/run/metrics.json" "$OUT/quickstart_gpu_metrics.json" 2>/dev/null
"$PYTHON" - "$WORK/run/metrics.json" "$OUT/quickstart_gpu_curve.png" <<'PY' || true
import sys
from ddl_mask2former.report import plot_learning_curve, read_metrics
_train, evaluation = read_metrics(sys.argv[1])
print("val curve (percent):")
for row in evaluation:
    print(f"  iter {row['iteration'] + 1:>5}: AUC {row['ddl/AUC']:6.2f}  F1 {row['ddl/F1']:6.2f}  IoU {row['ddl/IoU']:6.2f}")
plot_learning_curve(sys.argv[1], sys.argv[2], "quickstart model, one GPU, hard synthetic level")
print("curve:", sys.argv[2])
PY
[ "$status" -eq 0 ] || [ "$status" -eq 124 ]
