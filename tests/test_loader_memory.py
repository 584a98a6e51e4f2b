"""Loading keeps one copy of the weights: peak RSS grows by about the weights' size, not twice that."""
import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys, torch
from bunny_backend.model.loader import DTYPES, load_model
from bunny_backend.model.cpu_layout import use_cpu_linears
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_model(sys.argv[1], DTYPES[sys.argv[2]])
weights = sum(p.numel() * p.element_size() for p in model.parameters())
if sys.argv[3] == "cpu-layout":
    use_cpu_linears(model)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - base, "weights": weights}))
"""


@pytest.mark.parametrize("dtype,layout", [("float32", "plain"), ("bfloat16", "plain"), ("float32", "cpu-layout")])
def test_peak_memory_is_one_copy(checkpoint_factory, dtype, layout):
    path = checkpoint_factory(seed=7, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8,
                              intermediate_size=1536, vocab_size=16384)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), dtype, layout], capture_output=True, text=True,
                         check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    # one copy of the weights plus one tensor in flight and allocator slack; two copies would be >= 2.0x
    assert m["growth"] < 1.5 * m["weights"], m
