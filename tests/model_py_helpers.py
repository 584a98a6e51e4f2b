"""Driving model_repository/bunny/1/model.py in-process: the fake triton_python_backend_utils and engine of
fake_triton.py, a `model` fixture, and small request helpers (test_model_py*.py)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import fake_triton
from fake_triton import FakeEngine, Request

MODEL_PY = Path(__file__).resolve().parent.parent / "model_repository" / "bunny" / "1" / "model.py"


def text(s: str) -> np.ndarray:
    return np.array([s.encode()], dtype=object)


def load_model_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_triton.make_pb_utils())
    spec = importlib.util.spec_from_file_location("bunny_model_under_test", MODEL_PY)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def model(monkeypatch):
    mod = load_model_py(monkeypatch)
    monkeypatch.setattr(mod, "LLMEngine", FakeEngine)
    config = {"model_transaction_policy": {"decoupled": True},
              "parameters": {"model_path": {"string_value": "/some/ckpt"}, "max_num_seqs": {"string_value": "4"}}}
    m = mod.TritonPythonModel()
    m.initialize({"model_config": json.dumps(config), "model_name": "bunny"})
    yield m
    if not m._stop.is_set():
        m.finalize()


def run(model, **inputs) -> Request:
    req = Request(**inputs)
    assert model.execute([req]) is None
    return req


def outputs(resp) -> dict:
    return {k: v.tolist() for k, v in resp.tensors.items()}
