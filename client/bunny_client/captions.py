"""Caption files (the seed's `predict_result.json` form `{"<file name>": "<caption>"}`) and image folders.

Shared by `coco` (server), `reference` (no server) and `clip-score`: the same default prompt, the same image
listing, and a writer that replaces the file atomically (temp file + rename) so a crash never leaves half a JSON.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPT = "Describe this image in one sentence."
DEFAULT_CAPTION_TOKENS = 128
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The JPEG/PNG files of `folder` (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write `data` as JSON to `path` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_captions(path: str | os.PathLike) -> dict[str, str]:
    """A caption file's contents; {} when it does not exist. Raises ValueError when it is not that form."""
    path = Path(path)
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path} is not a JSON object of file name -> caption")
    return data


def pending_images(images: list[Path], done: dict[str, str]) -> list[Path]:
    """The images whose file name has no non-empty caption in `done` (what --resume still has to do)."""
    return [p for p in images if not done.get(p.name)]


class CaptionWriter:
    """Collects captions and rewrites the output file every `every_s` seconds and on `close()`."""

    def __init__(self, path: str | os.PathLike, initial: dict[str, str] | None = None, every_s: float = 5.0):
        self.path = Path(path)
        self.captions: dict[str, str] = dict(initial or {})
        self.every_s = every_s
        self._last_write = time.monotonic()
        self._dirty = False

    def add(self, name: str, caption: str) -> None:
        self.captions[name] = caption
        self._dirty = True
        if time.monotonic() - self._last_write >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self._dirty or not self.path.exists():
            write_json_atomic(self.path, self.captions)
            self._dirty = False
        self._last_write = time.monotonic()

    def close(self) -> None:
        self.flush()
