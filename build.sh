#!/usr/bin/env bash
# One entry point: ./build.sh setup | test | run | serve | bench  (see README.md)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
DEMO_MODEL="$ROOT/models/bunny-demo"

log() { echo "[build.sh] $*" >&2; }
# pip on these machines lists find-links folders that may not exist; keep its output to real problems.
pip_quiet() {
  local out rc=0
  out="$("$PY" -m pip "$@" 2>&1)" || rc=$?
  printf '%s\n' "$out" | grep -vE 'is ignored: it is neither a file nor a directory|BuildBackendWarning|Editable installation|Please be careful|name as your package|with strategy|^[[:space:]]*[*!]*[[:space:]]*$' >&2 || true
  return $rc
}

find_python311() {
  for c in python3.11 "$HOME/.pyenv/versions/3.11.7/bin/python3.11" /usr/bin/python3.11; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  log "Python 3.11 not found (install it, e.g. apt-get install python3.11-venv)"; return 1
}

setup_venv() {
  if [ ! -x "$PY" ]; then
    log "creating .venv"
    "$(find_python311)" -m venv "$VENV"
    pip_quiet install -q --upgrade pip
  fi
  local stamp="$VENV/.bunny-stamp" want
  want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  local extras="serve,client,test"
  # Keep a torch the user installed for an accelerator; otherwise take the pinned CPU build.
  if "$PY" -c 'import torch, sys; sys.exit(0 if (torch.cuda.is_available() or hasattr(torch, "npu")) else 1)' 2>/dev/null; then
    log "keeping the installed accelerator torch"
  else
    extras="cpu,$extras"
  fi
  log "installing python packages"
  pip_quiet install -q -e ".[${extras}]"
  echo "$want" > "$stamp"
}

setup_triton() {
  # tritonserver from the nvidia-pytriton wheel, with the Python backend stub for our interpreter (build/triton)
  bash "$ROOT/backend/bunny_backend/tools/setup_triton.sh" "$VENV"
}

setup_client_extras() {
  # perf_analyzer (inside the tritonclient wheel) links libb64.so.0d
  if ! ldconfig -p | grep -q 'libb64.so.0d' && command -v apt-get >/dev/null 2>&1; then
    log "installing libb64-0d for perf_analyzer"
    { apt-get update -qq && apt-get install -y -qq libb64-0d; } >/dev/null 2>&1 || log "could not install libb64-0d (perf_analyzer will be skipped)"
  fi
  # The open_clip judge goes to a private folder: PyPI's torchvision is a CUDA build that must not sit beside the
  # CPU torch in site-packages (transformers imports it whenever it is installed). See client/bunny_client/openclip_import.py.
  if [ ! -d "$VENV/clip-site/open_clip" ]; then
    log "installing open_clip for clip-score into .venv/clip-site"
    pip_quiet install -q --no-deps --target "$VENV/clip-site" \
      open-clip-torch==3.3.0 torchvision==0.28.0 ftfy==6.3.1 wcwidth==0.9.4
  fi
}

setup_demo() {
  if [ ! -f "$DEMO_MODEL/config.json" ]; then
    log "writing the demo checkpoint to models/bunny-demo (random weights)"
    "$PY" -m bunny_backend.tools.demo_checkpoint --out "$DEMO_MODEL"
  fi
}

setup_kernels() {
  # Prebuild the C++ CPU kernels (backend/bunny_backend/ops/cpu_kernels.py) so that the first server start does not compile them.
  # Never fatal: without them the portable attention runs.
  local stamp="$ROOT/build/torch_extensions/.setup-stamp" want why
  want="$(cat backend/bunny_backend/ops/csrc/* backend/bunny_backend/ops/cpu_kernels.py "$VENV/.bunny-stamp" <(grep -m1 -E '^(flags|Features)' /proc/cpuinfo) 2>/dev/null | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  if why="$("$PY" -m bunny_backend.ops.cpu_kernels 2>&1)"; then
    echo "$want" > "$stamp"
  else
    log "the C++ CPU kernels did not build (the portable attention runs instead): $(printf '%s' "$why" | head -c 300)"
  fi
}

setup() { setup_venv; setup_triton; setup_client_extras; setup_demo; setup_kernels; }

cmd="${1:-run}"; shift || true
case "$cmd" in
  setup) setup ;;
  test)
    setup
    # A C++ kernel that does not build makes its tests fail here rather than skip (tests/cpu_kernel_helpers.py),
    # wherever a compiler exists; a plain `pytest`, or BUNNY_REQUIRE_CPU_KERNELS=0, keeps the skips.
    if [ -z "${BUNNY_REQUIRE_CPU_KERNELS:-}" ]; then
      if command -v "${CXX:-c++}" >/dev/null 2>&1; then
        export BUNNY_REQUIRE_CPU_KERNELS=1
      else
        log "no C++ compiler (${CXX:-c++}): the CPU kernels' tests skip instead of failing"
      fi
    fi
    "$PY" -m pytest -q "$@" ;;
  run)
    setup
    exec "$PY" -m bunny_backend.tools.run_demo --model-path "${BUNNY_MODEL_PATH:-$DEMO_MODEL}" "$@" ;;
  serve)
    setup
    exec "$VENV/bin/bunny-serve" --model-path "${BUNNY_MODEL_PATH:-$DEMO_MODEL}" --openai-port 9000 "$@" ;;
  bench)
    setup
    exec "$PY" -m bench.run "$@" ;;
  *) echo "usage: ./build.sh setup|test|run|serve|bench" >&2; exit 2 ;;
esac
