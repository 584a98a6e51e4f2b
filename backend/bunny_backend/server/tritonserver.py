"""Where tritonserver lives and how to start it: one place for bunny-serve and the test fixture.

pytriton's wheel ships the `tritonserver` binary, the python backend and one stub per Python version;
`backend/bunny_backend/tools/setup_triton.sh` lays the backend out under `build/triton/backends/python` with the stub of
our interpreter. The stub embeds libpython: it must find *this* interpreter's libpython first on
LD_LIBRARY_PATH, and it locates the venv's site-packages through the first `python3` on PATH.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from bunny_backend.utils.engine_env import engine_env

ROOT = Path(__file__).resolve().parents[3]   # the checkout (backend/bunny_backend is installed editable)
MODEL_REPOSITORY = ROOT / "model_repository"
BACKEND_DIR = ROOT / "build" / "triton" / "backends"
SETUP_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "setup_triton.sh"


@dataclass(frozen=True, slots=True)
class Ports:
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002
    address: str = "127.0.0.1"   # what every endpoint binds

    @property
    def probe_host(self) -> str:
        """Where this machine reaches the endpoints (a wildcard address is reached on loopback)."""
        host = "127.0.0.1" if self.address in ("0.0.0.0", "", "localhost") else self.address
        return "::1" if host == "::" else host

    @property
    def http_url(self) -> str:
        host = self.probe_host
        return f"http://[{host}]:{self.http}" if ":" in host else f"http://{host}:{self.http}"


def pytriton_dir() -> Path:
    """The nvidia-pytriton package's folder, found without importing it (importing pytriton pulls its whole client
    stack, which a host carrying only the server's files lacks)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed; run ./build.sh setup")
    return Path(spec.submodule_search_locations[0]).resolve()


def tritonserver_binary() -> Path:
    return pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def venv_bin() -> Path:
    """The directory of the running interpreter (the venv's bin/, not the resolved base interpreter)."""
    return Path(sys.executable).parent


def ensure_backend_dir() -> Path:
    """Run setup_triton.sh if the python backend with our stub is missing; return the backend directory."""
    stub = BACKEND_DIR / "python" / "triton_python_backend_stub"
    if not stub.exists() or not (BACKEND_DIR / "python" / "libtriton_python.so").exists():
        venv = venv_bin().parent
        subprocess.run(["bash", str(SETUP_SCRIPT), str(venv)], check=True)
    return BACKEND_DIR


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: our libpython first, then pytriton's bundled libs; venv bin/ first on PATH."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    bundled = pytriton_dir().parent / "nvidia_pytriton.libs"
    ld = [libdir, str(bundled)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(ld))
    path = [str(venv_bin())] + [p for p in env.get("PATH", "").split(":") if p]
    env["PATH"] = ":".join(dict.fromkeys(path))
    env.pop("PYTHONHOME", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return engine_env(env)   # the model's stub processes run the engine


def server_command(repository: Path, ports: Ports, *, log_verbose: int = 0, exit_timeout_s: int = 20,
                   models: tuple[str, ...] = ("bunny",), extra_args: tuple[str, ...] = ()) -> list[str]:
    """tritonserver command line serving `models` of `repository`, every endpoint bound to `ports.address`
    (127.0.0.1 unless asked otherwise); `extra_args` go last (TLS, restricted APIs: tritonserver --help).

    Explicit model control (the models are still loaded at start) lets bunny-serve unload a model through the
    HTTP repository API, the one way to make Triton report it not ready once its stub process died."""
    return [
        str(tritonserver_binary()),
        f"--model-repository={repository}",
        "--model-control-mode=explicit", *(f"--load-model={m}" for m in models),
        f"--backend-directory={ensure_backend_dir()}",
        f"--grpc-address={ports.address}", f"--grpc-port={ports.grpc}",
        f"--http-address={ports.address}", f"--http-port={ports.http}",
        f"--metrics-address={ports.address}", f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",
        "--exit-on-error=true",
        "--strict-readiness=true",
        f"--exit-timeout-secs={exit_timeout_s}",
        f"--log-verbose={log_verbose}",
        *extra_args,
    ]
