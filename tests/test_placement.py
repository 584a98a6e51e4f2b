"""Where each engine runs: Triton instances (stub/instance.py) and tensor-parallel ranks (engine/worker/device.py)."""
import dataclasses

import torch

from bunny_backend.config import EngineConfig
from bunny_backend.engine.worker.device import DevicePlan, Placement, host_cores
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


def test_ranks_take_the_devices_after_the_first_and_split_the_cores():
    plan = DevicePlan.resolve(EngineConfig(device="cpu", tensor_parallel_size=2), Placement(None, 2))
    assert plan.num_threads == max(1, host_cores() // 4) and plan.for_rank(1) == plan
    assert DevicePlan.resolve(EngineConfig(device="cpu")).num_threads == 0            # one engine: torch's default
    assert DevicePlan.resolve(EngineConfig(device="cpu", num_threads=3, tensor_parallel_size=2)).num_threads == 3
    gpu = dataclasses.replace(plan, device=torch.device("cuda", 2))
    assert gpu.for_rank(1).device == torch.device("cuda", 3) and gpu.for_rank(0).device == torch.device("cuda", 2)
