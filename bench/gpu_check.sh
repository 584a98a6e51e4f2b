#!/usr/bin/env bash
# What a session with an NVIDIA GPU runs, in one go (issue #17): the gpu-marked tests, the Bunny-2B-shape bench
# with and without CUDA graphs (engine, transformers, and Triton where tritonserver is there), and a profile of
# batch-1 decode. Every step has its own time limit; logs and results go to OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR            # in a checkout whose Python has a CUDA torch (and triton)
#
# On a machine without this project's venv (the lent GPU machines), the package is put on PYTHONPATH from the
# checkout, and a .gpu/pt.zip carried beside it (tritonserver + tritonclient, see docs/performance.md) is unpacked.
set -u
OUT="${1:?usage: gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import bunny_backend" 2>/dev/null; then
  export PYTHONPATH="$ROOT/backend:$ROOT/client:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  # Triton's python stub does not take PYTHONPATH from the server's environment: a .pth in site-packages does it.
  printf '%s\n' "$ROOT/backend" "$ROOT/client" >"$("$PY" -c 'import site; print(site.getsitepackages()[0])')/bunny-checkout.pth" || true
fi
if [ -f .gpu/pt.zip ]; then
  "$PY" -m zipfile -e "$ROOT/.gpu/pt.zip" /tmp/site
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site"
  ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  dest=build/triton/backends/python
  mkdir -p "$dest"
  cp /tmp/site/pytriton/tritonserver/backends/python/* "$dest/"
  cp "/tmp/site/pytriton/tritonserver/python_backend_stubs/$ver/triton_python_backend_stub" "$dest/"
  chmod +x "$dest/triton_python_backend_stub" /tmp/site/pytriton/tritonserver/bin/tritonserver
fi

step() {  # step NAME SECONDS CMD...: run with a limit, log to OUT/NAME.log, say how it ended
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-6}" "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, torch.cuda.get_device_name())'
  "$PY" -c 'import triton; print("triton", triton.__version__)'
  "$PY" -c 'import transformers; print("transformers", transformers.__version__)'
  "$PY" -c 'import flash_attn; print("flash_attn", flash_attn.__version__)' 2>/dev/null || echo "flash_attn: not installed"
} 2>&1

[ -n "${SKIP_TESTS:-}" ] || TAIL=12 step gpu-tests "${GPU_TESTS_S:-150}" "$PY" -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu.py
# Separate runs so that one system hanging past its limit costs only its own figures. CUDA graphs are the default.
[ -n "${SKIP_HF:-}" ] || step bench-hf "${BENCH_S:-240}" "$PY" -m bench.run --model 2b --skip-triton \
  --hf-batch-sizes "${HF_SIZES:-1,2,4,6,8,10}" --scenarios none --out "$OUT/2b-hf.json"
[ -n "${SKIP_EAGER:-}" ] || step bench-eager "${EAGER_S:-100}" "$PY" -m bench.run --model 2b --skip-triton --skip-hf \
  --no-cuda-graphs --scenarios none --out "$OUT/2b-eager.json"
step bench-triton "${TRITON_S:-200}" "$PY" -m bench.run --model 2b --skip-hf --scenarios none --out "$OUT/2b-triton.json"
TAIL=40 step profile "${PROFILE_S:-60}" "$PY" -m bench.profile --model 2b --batch-sizes 1,10 --steps 24 --rows 16
rm -f "$OUT"/*.png   # the results JSONs carry the figures; at most 8 files come back
