"""Another revision's engine for before/after figures from one run: `bunny_backend` of git revision REV, checked
out in a temporary worktree and put first on the workers' PYTHONPATH (the bench's own code stays this one's)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from bench.models import ROOT


@contextmanager
def baseline_env(rev: str):
    """Yields (environment for the worker processes, the full commit id)."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="bunny-baseline-"))
    src, path = tmp / "src", tmp / "path"
    subprocess.run(["git", "worktree", "add", "--detach", str(src), commit], cwd=ROOT, check=True, capture_output=True)
    try:
        path.mkdir()
        package = src / "backend" / "bunny_backend"   # the layout since the package folders were named
        (path / "bunny_backend").symlink_to(package if package.is_dir() else src / "backend")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}
        yield env, commit
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
