#!/usr/bin/env bash
# What a session with an NVIDIA GPU runs, in one go (issues #17, #29): the gpu-marked tests (the Triton kernels at
# scale, warm-up, graphs, model parity), the kernels' own timings and launch-shape sweep, the Bunny-2B-shape bench
# with and without CUDA graphs and with prefix caching on and a different image per request (engine, transformers,
# and Triton where tritonserver is there), and a profile.
# Every step has its own time limit; logs and results go to OUTDIR. Nothing here needs the network.
#
#   bash bench/gpu_check.sh OUTDIR            # in a checkout whose Python has a CUDA torch (and triton)
#   ONLY="gpu-tests kernel-times" bash bench/gpu_check.sh OUTDIR   # some steps (one call may not hold them all)
#
# On a machine without this project's venv (the lent GPU machines), the package is put on PYTHONPATH from the
# checkout. What serving needs and the host lacks comes carried beside it, in .gpu/serve-site.tar.xz (or the older
# .gpu/pt.zip), unpacked to /tmp/site: tritonserver and the libraries it links from nvidia_pytriton.libs, the stub
# for the host's Python, tritonclient, numpy 1.26.4 (Triton 2.51's stub garbles BYTES under numpy 2), fastapi,
# starlette, pydantic, pydantic-core, annotated-types, typing-inspection, opentelemetry-api, uvicorn, protobuf 4.25
# and python-rapidjson (docs/performance.md). That site goes first on the path of the engine and Triton steps only:
# the transformers baseline runs on the host's own packages (its transformers does not import under numpy 1.26).
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
HOST_PYTHONPATH="${PYTHONPATH:-}"   # the checkout and the host's own packages: the transformers baseline's path
SERVE_PYTHONPATH="$HOST_PYTHONPATH"
carried=""
if [ -f .gpu/serve-site.tar.xz ]; then carried=tar; elif [ -f .gpu/pt.zip ]; then carried=zip; fi
if [ -n "$carried" ]; then
  mkdir -p /tmp/site
  if [ "$carried" = tar ]; then tar -xJf .gpu/serve-site.tar.xz -C /tmp/site; else "$PY" -m zipfile -e .gpu/pt.zip /tmp/site; fi
  SERVE_PYTHONPATH="/tmp/site${HOST_PYTHONPATH:+:$HOST_PYTHONPATH}"
  # Found, not imported: importing pytriton pulls its whole client stack.
  pt="$(PYTHONPATH="$SERVE_PYTHONPATH" "$PY" -c 'import importlib.util as u; print(u.find_spec("pytriton").submodule_search_locations[0])')"
  ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  dest=build/triton/backends/python
  mkdir -p "$dest"
  cp "$pt"/tritonserver/backends/python/* "$dest/"
  cp "$pt/tritonserver/python_backend_stubs/$ver/triton_python_backend_stub" "$dest/"
  chmod +x "$dest/triton_python_backend_stub" "$pt/tritonserver/bin/tritonserver"
fi

step() {  # step NAME SECONDS CMD...: run with a limit, log to OUT/NAME.log, say how it ended (ONLY="NAME ...": those)
  local name="$1" limit="$2"; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
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

serve=(env "PYTHONPATH=$SERVE_PYTHONPATH")   # a step on the carried serving packages
host=(env "PYTHONPATH=$HOST_PYTHONPATH")     # a step on the host's own packages

[ -n "${SKIP_TESTS:-}" ] || TAIL=14 step gpu-tests "${GPU_TESTS_S:-300}" "${host[@]}" "$PY" -m pytest -q -s -p no:cacheprovider \
  -m gpu tests/test_triton_kernels.py tests/test_warm_up.py tests/test_gpu.py tests/test_mixed_graphs.py
TAIL=30 step kernel-times "${KERNEL_S:-120}" "${host[@]}" "$PY" -m bench.kernel_times
[ -n "${SKIP_TUNE:-}" ] || TAIL=40 step tune-kernels "${TUNE_S:-240}" "${host[@]}" "$PY" -m bench.tune_kernels --quick
# Separate runs so that one system hanging past its limit costs only its own figures. CUDA graphs are the default.
[ -n "${SKIP_HF:-}" ] || step bench-hf "${BENCH_S:-240}" "${host[@]}" "$PY" -m bench.run --model 2b --skip-triton --skip-engine \
  --hf-batch-sizes "${HF_SIZES:-1,2,4,6,8,10}" --scenarios none --out "$OUT/2b-hf.json"
[ -n "${SKIP_EAGER:-}" ] || step bench-eager "${EAGER_S:-100}" "${serve[@]}" "$PY" -m bench.run --model 2b --skip-triton --skip-hf \
  --no-cuda-graphs --scenarios none --out "$OUT/2b-eager.json"
step bench-triton "${TRITON_S:-240}" "${serve[@]}" "$PY" -m bench.run --model 2b --skip-hf --batch-sizes "${SIZES:-1,10,64,256}" \
  --scenarios none --out "$OUT/2b-triton.json"
[ -n "${SKIP_PREFIX:-}" ] || step bench-prefix "${PREFIX_S:-200}" "${serve[@]}" "$PY" -m bench.run --model 2b --skip-hf --skip-triton \
  --prefix-caching --distinct-images --batch-sizes "${SIZES:-1,10,64,256}" --scenarios none --out "$OUT/2b-prefix.json"
TAIL=40 step profile "${PROFILE_S:-90}" "${serve[@]}" "$PY" -m bench.profile --model 2b --batch-sizes 1,64 --steps 24 --rows 16
rm -f "$OUT"/*.png   # the results JSONs carry the figures; at most 8 files come back
