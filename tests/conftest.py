"""Shared fixtures: tiny random checkpoints (built once per session) and real test images."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bunny_backend.tools.demo_checkpoint import build_checkpoint

pytest_plugins = ["server_fixture", "reliability_report", "openai_server_helpers"]   # the real tritonserver; figures in the summary

IMAGE_FILES = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]   # square, wide, wide, JPEG


def skimage_data_dir() -> Path:
    import skimage.data
    return Path(os.path.dirname(skimage.data.__file__))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """`checkpoint_factory(**build_checkpoint kwargs) -> Path`; equal kwargs share one folder. Treat it as read-only."""
    built: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in built:
            built[key] = build_checkpoint(tmp_path_factory.mktemp("ckpt"), **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory()


@pytest.fixture(scope="session")
def test_images() -> list[bytes]:
    """Encoded image files: astronaut (512x512), coffee (600x400), chelsea (451x300), rocket (640x427 JPEG)."""
    return [(skimage_data_dir() / name).read_bytes() for name in IMAGE_FILES]


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory) -> Path:
    """A folder holding the four test images under their own names."""
    folder = tmp_path_factory.mktemp("images")
    for name in IMAGE_FILES:
        shutil.copy(skimage_data_dir() / name, folder / name)
    return folder
