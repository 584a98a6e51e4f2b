"""Which of the model's Triton instances this stub is, and where its engine runs (data parallelism).

Triton starts one stub process per instance of `instance_group` (count, and with KIND_GPU one per listed GPU);
each runs its own engine. KIND_GPU gives an instance its GPU (`model_instance_device_id`): an engine of N
tensor-parallel ranks whose first GPU is g uses g..g+N-1, so list every N-th GPU (`gpus: [0, 2]` for two
instances of N = 2 on four GPUs). Triton has no NPU kind: with KIND_CPU on an accelerator, instance k (the
number ending its name) takes devices k*N..k*N+N-1. On the CPU the instances (and their ranks) split the cores.
"""
from __future__ import annotations

import re

from bunny_backend.engine.worker.device import Placement


def instance_count(model_config: dict) -> int:
    groups = model_config.get("instance_group") or [{}]
    return sum(int(g.get("count", 1)) * max(1, len(g.get("gpus") or [])) for g in groups)


def placement(args: dict, model_config: dict, tensor_parallel_size: int) -> Placement:
    count = instance_count(model_config)
    if args.get("model_instance_kind") == "GPU":
        return Placement(int(args.get("model_instance_device_id", 0)), count)
    if count == 1:
        return Placement(None, 1)
    m = re.search(r"_(\d+)$", args.get("model_instance_name", ""))
    return Placement(int(m.group(1)) * tensor_parallel_size if m else None, count)
