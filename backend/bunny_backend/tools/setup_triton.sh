#!/usr/bin/env bash
# Lay out a Triton backend directory for the venv's interpreter:
#   build/triton/backends/python/{libtriton_python.so, triton_python_backend_utils.py, triton_python_backend_stub}
# pytriton ships the python backend and one stub per Python version; Triton looks for the stub next to
# libtriton_python.so, so we copy the stub that matches the venv's Python X.Y beside a copy of the backend.
# Idempotent and quiet: prints nothing when everything is already in place.
# Usage: backend/bunny_backend/tools/setup_triton.sh VENV
set -euo pipefail
VENV="${1:?usage: setup_triton.sh VENV}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
PY="$VENV/bin/python"
DEST="$ROOT/build/triton/backends/python"

read -r PT PYVER < <("$PY" - <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("pytriton")   # not imported: pytriton pulls its whole client stack
print(os.path.join(spec.submodule_search_locations[0], "tritonserver"), f"{sys.version_info[0]}.{sys.version_info[1]}")
EOF
) || { echo "[setup_triton] nvidia-pytriton is not installed in $VENV" >&2; exit 1; }

STUB="$PT/python_backend_stubs/$PYVER/triton_python_backend_stub"
[ -x "$STUB" ] || { echo "[setup_triton] pytriton has no python backend stub for Python $PYVER" >&2; exit 1; }

copy_if_changed() {  # src dst
  if ! cmp -s "$1" "$2"; then
    mkdir -p "$(dirname "$2")"
    cp -f "$1" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"
    changed=1
  fi
}

changed=0
copy_if_changed "$PT/backends/python/libtriton_python.so" "$DEST/libtriton_python.so"
copy_if_changed "$PT/backends/python/triton_python_backend_utils.py" "$DEST/triton_python_backend_utils.py"
copy_if_changed "$STUB" "$DEST/triton_python_backend_stub"
chmod +x "$DEST/triton_python_backend_stub"
if [ "$changed" = 1 ]; then
  echo "[setup_triton] python backend (stub for Python $PYVER) ready in ${DEST#"$ROOT"/}" >&2
fi
