"""Where each engine runs: Triton instances (stub/instance.py) and tensor-parallel ranks (engine/worker/device.py)."""
import dataclasses

import pytest
import torch

from bunny_backend.config import EngineConfig
from bunny_backend.engine.worker.device import DevicePlan, Placement
from bunny_backend.stub.instance import placement


def test_gpu_instances_take_their_gpu_and_count_every_listed_gpu():
    config = {"instance_group": [{"count": 1, "kind": "KIND_GPU", "gpus": [0, 2]}]}
    args = {"model_instance_kind": "GPU", "model_instance_device_id": "2", "model_instance_name": "bunny_0_1"}
    assert placement(args, config, 2) == Placement(2, 2)


def test_cpu_kind_instances_take_consecutive_devices_by_their_number():
    config = {"instance_group": [{"count": 3, "kind": "KIND_CPU"}]}
    args = {"model_instance_kind": "CPU", "model_instance_device_id": "0", "model_instance_name": "bunny_0_2"}
    assert placement(args, config, 2) == Placement(4, 3)
    assert placement({**args, "model_instance_name": "bunny_0_0"}, {"instance_group": [{"count": 1}]}, 2) == \
        Placement(None, 1)


@pytest.mark.parametrize("cores,engines,tp,threads", [
    (16, 2, 2, 4),    # 4 processes share 16 cores: 4 threads each
    (16, 1, 2, 8),
    (16, 3, 1, 5),    # rounded down
    (2, 2, 2, 1),     # fewer cores than processes: still one thread each
    (3, 2, 2, 1),
    (16, 1, 1, 0),    # one engine, one process: 0, torch's default (all cores)
], ids=["16c-2x2", "16c-tp2", "16c-3inst", "2c-2x2", "3c-2x2", "16c-alone"])
def test_processes_split_the_host_cores(monkeypatch, cores, engines, tp, threads):
    """The rule stated as numbers: each of engines x tp processes takes cores // processes threads (at least 1)."""
    import bunny_backend.engine.worker.device as device
    monkeypatch.setattr(device, "host_cores", lambda: cores)
    plan = DevicePlan.resolve(EngineConfig(device="cpu", tensor_parallel_size=tp), Placement(None, engines))
    assert plan.num_threads == threads


def test_ranks_take_the_devices_after_the_first_and_split_the_cores(monkeypatch):
    import bunny_backend.engine.worker.device as device
    monkeypatch.setattr(device, "host_cores", lambda: 12)
    plan = DevicePlan.resolve(EngineConfig(device="cpu", tensor_parallel_size=2), Placement(None, 2))
    assert plan.num_threads == 3 and plan.for_rank(1) == plan
    assert DevicePlan.resolve(EngineConfig(device="cpu")).num_threads == 0            # one engine: torch's default
    assert DevicePlan.resolve(EngineConfig(device="cpu", num_threads=3, tensor_parallel_size=2)).num_threads == 3
    gpu = dataclasses.replace(plan, device=torch.device("cuda", 2))
    assert gpu.for_rank(1).device == torch.device("cuda", 3) and gpu.for_rank(0).device == torch.device("cuda", 2)
