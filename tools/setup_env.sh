#!/usr/bin/env bash
# Create or update the project's virtual environment; idempotent, seconds when nothing changed.
#   VENV=/path/to/venv tools/setup_env.sh     (default: <checkout>/.venv)
#   PYTHON=python3.11                        (interpreter used to create the venv)
# Installs requirements/torch.txt, detectron2 (see below), requirements/base.txt,
# requirements/bench.txt, requirements/deploy.txt (ONNX export and runtime), requirements/serve.txt
# (the torch-free runtime), then this project editable (which builds the CUDA op when it can).
# Debian's chromium and chromedriver (tests/test_serve_browser.py) are apt-installed when running
# as root with apt-get available; elsewhere that test skips with a reason.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.ddl-ready"

say() { echo "[setup_env] $*"; }

# Everything that changes what gets installed goes into the stamp.
inputs_hash() {
  cat "$ROOT"/requirements/*.txt "$ROOT/setup.py" "$ROOT/tools/setup_env.sh" \
      "$ROOT/tools/repack_detectron2_wheel.py" \
      $(find "$ROOT/projects/DDLMask2Former/ddl_mask2former/ops/csrc" -type f 2>/dev/null | sort) \
    | sha256sum | cut -d' ' -f1
}

# Source photographs of the varied synthetic generator (data/synthetic_sources.py): the
# photographs of two Debian wallpaper packages, unpacked into the venv (unpacking needs no root).
# Checked on every run, before the stamp, so that a venv made before this step gets them too.
install_photos() {
  local dest="$VENV/share/ddl-photos" packages=(lomiri-wallpapers-16.04 lomiri-wallpapers-20.04)
  [ -f "$dest/.ready" ] && return 0
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    say "WARNING: no apt-get/dpkg-deb: the synthetic generator runs without ${packages[*]}"
    return 0
  fi
  local debs
  debs="$(mktemp -d)"
  if ! (cd "$debs" && apt-get download -q "${packages[@]}" >/dev/null 2>&1); then
    # A fresh machine may have no package lists yet; as root, fetch them once.
    [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 || true
    if ! (cd "$debs" && apt-get download -q "${packages[@]}" >/dev/null 2>&1); then
      say "WARNING: could not download ${packages[*]}: the synthetic generator runs without them"
      rm -rf "$debs"
      return 0
    fi
  fi
  mkdir -p "$dest"
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$dest"; done
  rm -rf "$debs"
  touch "$dest/.ready"
  say "source photographs (${packages[*]}) unpacked into $dest"
}

# Headless Chromium for the web page's browser test: Debian's packages, never a browser download.
install_chromium() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's chromium and chromium-driver (tests/test_serve_browser.py)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
      say "apt-get could not install chromium: tests/test_serve_browser.py will skip"
    fi
  else
    say "chromium/chromedriver missing and not root with apt-get: tests/test_serve_browser.py will skip"
  fi
}

WANT="$(inputs_hash)"
install_chromium
if [ -x "$VENV/bin/python" ]; then install_photos; fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  say "environment up to date: $VENV"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check --progress-bar off -q)
rm -f "$STAMP"

say "installing PyTorch (requirements/torch.txt)"
"${PIP[@]}" -r "$ROOT/requirements/torch.txt"

# detectron2, in order: already importable -> keep; official git install when GitHub answers;
# otherwise PyPI's sal-detectron2 wheel re-tagged for this Python (ENVIRONMENT.md explains).
if "$PY" -c "import detectron2" 2>/dev/null; then
  say "detectron2 already importable: keeping $("$PY" -c 'import detectron2; print(detectron2.__version__)')"
elif timeout 20 git ls-remote https://github.com/facebookresearch/detectron2.git HEAD >/dev/null 2>&1; then
  say "installing detectron2 from its official git repository"
  "${PIP[@]}" --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
else
  say "GitHub unreachable: installing detectron2 from PyPI's sal-detectron2==0.7.2, re-tagged"
  WHEELS="$(mktemp -d)"
  trap 'rm -rf "$WHEELS"' EXIT
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      --python-version 3.10 sal-detectron2==0.7.2 -d "$WHEELS/src"
  REPACKED="$("$PY" "$ROOT/tools/repack_detectron2_wheel.py" "$WHEELS"/src/*.whl "$WHEELS")"
  "${PIP[@]}" --no-deps "$REPACKED"
fi

say "installing dependencies (requirements/base.txt, bench.txt, deploy.txt, serve.txt)"
"${PIP[@]}" -r "$ROOT/requirements/base.txt" -r "$ROOT/requirements/bench.txt" -r "$ROOT/requirements/deploy.txt" \
    -r "$ROOT/requirements/serve.txt"

# The CUDA op compiles when nvcc is found (setup.py finds the toolkit root from nvcc itself).
say "installing ddl-mask2former (editable; CUDA op built when nvcc is present: takes minutes)"
(cd "$ROOT" && "${PIP[@]}" --no-build-isolation -e .)

"$PY" -c "import detectron2, ddl_mask2former, ddl_mask2former_serve; print('[setup_env] detectron2', detectron2.__version__, '| ddl_mask2former', ddl_mask2former.__version__)"
install_photos
echo "$WANT" > "$STAMP"
say "ready: $VENV (activate with: source $VENV/bin/activate)"
