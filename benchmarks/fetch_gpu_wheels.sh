#!/usr/bin/env bash
# Fill .gpu-wheels/ (git-ignored) with what the GPU machine lacks for the whole-model benchmarks:
# detectron2 (PyPI's sal-detectron2, re-tagged pure Python by tools/repack_detectron2_wheel.py)
# and its pure-Python dependencies, pycocotools for CPython 3.12, and transformers (installed
# there only when the machine's own copy does not import). About 15 MiB; the device tool carries
# it with `carry: [".gpu-wheels"]` and benchmarks/gpu_check.sh installs it into /tmp.
#   benchmarks/fetch_gpu_wheels.sh        (PYTHON=<venv python>, default .venv/bin/python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="$ROOT/.gpu-wheels"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$DEST"
PIP=("$PY" -m pip --disable-pip-version-check -q)
# Versions as in this project's venv (requirements/base.txt); built locally where PyPI has only sdists.
"${PIP[@]}" wheel --no-deps -w "$DEST" fvcore==0.1.5.post20221221 iopath==0.1.10 \
  antlr4-python3-runtime==4.9.3 yacs==0.1.8 termcolor==3.3.0 omegaconf==2.3.1 hydra-core==1.3.8
"${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" pycocotools==2.0.11
"${PIP[@]}" download --no-deps --only-binary=:all: -d "$DEST/optional" transformers==5.24.0
"${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.10 -d "$TMP" sal-detectron2==0.7.2
"$PY" "$ROOT/tools/repack_detectron2_wheel.py" "$TMP"/sal_detectron2-*.whl "$DEST" >/dev/null
# scikit-image and its pure-Python dependencies for benchmarks/gpu_quickstart.sh (the synthetic data
# generator's source photographs ship inside scikit-image), installed there only when missing.
"${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST/quickstart" scikit-image==0.26.0 imageio==2.38.1 lazy-loader==0.6 tifffile==2026.3.3 networkx==3.6.1
du -sh "$DEST"
ls "$DEST" "$DEST/optional"
