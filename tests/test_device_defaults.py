"""Defaults sized to the device (engine/worker/device.py, kv_cache.fit_max_num_seqs) and the CPUs a process may
use (affinity, cgroup quota)."""

import pytest
import torch

from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.worker import device
from bunny_backend.engine.worker.device import DevicePlan
from bunny_backend.engine.worker.kv_cache import fit_max_num_seqs


def test_max_num_seqs_defaults_by_device(monkeypatch):
    assert DevicePlan.resolve(EngineConfig(device="cpu")).max_num_seqs == 16
    assert DevicePlan.resolve(EngineConfig(device="cpu", max_num_batched_tokens=8)).max_num_seqs == 8
    assert DevicePlan.resolve(EngineConfig(device="cpu", max_num_seqs=40)).max_num_seqs == 40
    monkeypatch.setattr(device, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(device, "cuda_sm_count", lambda d: 132)
    assert DevicePlan.resolve(EngineConfig(device="cuda")).max_num_seqs == 256
    assert DevicePlan.resolve(EngineConfig(device="cuda", max_num_seqs=64)).max_num_seqs == 64
    plans = [DevicePlan.resolve(EngineConfig(device="cuda", **kw)) for kw in (
        {}, {"max_num_seqs": 400, "max_num_batched_tokens": 4096}, {"max_queued_requests": 5})]
    assert [p.max_queued_requests for p in plans] == [256, 400, 5]   # 256, or max_num_seqs where that is more


def test_step_token_budget_defaults_by_device(monkeypatch):
    assert DevicePlan.resolve(EngineConfig(device="cpu")).max_num_batched_tokens == 4096
    assert DevicePlan.resolve(EngineConfig(device="cpu", max_num_batched_tokens=100)).max_num_batched_tokens == 100
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(4096\) must be >= max_num_seqs \(5000\)"):
        DevicePlan.resolve(EngineConfig(device="cpu", max_num_seqs=5000))
    monkeypatch.setattr(device, "resolve_device", lambda name: torch.device("cuda"))
    for sms, want in [(132, 8192), (108, 4096), (16, 4096), (1000, 16384)]:   # H200, A100, small, beyond
        monkeypatch.setattr(device, "cuda_sm_count", lambda d, sms=sms: sms)
        assert DevicePlan.resolve(EngineConfig(device="cuda")).max_num_batched_tokens == want
    assert DevicePlan.resolve(EngineConfig(device="cuda", max_num_batched_tokens=512)).max_num_batched_tokens == 512
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 0"):
        EngineConfig(max_num_batched_tokens=-1)


@pytest.mark.parametrize("kind,asked,kv_tokens,want", [
    ("cuda", False, 2048 * 1000, 256),   # holds 1000 full-context sequences: the device's 256 stand
    ("cuda", False, 2048 * 40, 40),      # holds 40: capped there
    ("cuda", False, 2048 * 3, 16),       # holds 3: never below 16 (requests are mostly far shorter)
    ("cuda", True, 2048 * 3, 256),       # asked for in the config: it stands
    ("cpu", False, 2048 * 3, 256),       # the CPU's own default is not capped (16 unless asked)
])
def test_an_accelerator_default_is_capped_by_what_the_kv_cache_holds(kind, asked, kv_tokens, want):
    config = EngineConfig(max_num_seqs=256, max_queued_requests=256)
    fitted = fit_max_num_seqs(config, kv_tokens, 2048, torch.device(kind), asked=asked)
    assert fitted.max_num_seqs == want


def test_an_engine_fills_in_its_defaults(tiny_checkpoint):
    engine = LLMEngine(EngineConfig(model_path=str(tiny_checkpoint), device="cpu", dtype="float32",
                                    kv_cache_memory_bytes=4 << 20))
    assert (engine.config.max_num_seqs, engine.config.max_queued_requests) == (16, 256)
    assert engine.scheduler.max_num_seqs == 16
    engine.shutdown()


@pytest.mark.parametrize("text,want", [("max 100000\n", None), ("150000 100000\n", 1.5), ("200000 100000", 2.0),
                                        ("garbage", None)])
def test_the_cgroup_quota_is_read(tmp_path, text, want):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert device.cgroup_cpu_quota(str(path)) == want
    assert device.cgroup_cpu_quota(str(tmp_path / "missing")) is None


def test_threads_follow_a_quota_below_the_affinity(monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(device, "cgroup_cpu_quota", lambda: 1.5)
    assert device.host_cores() == 2
    monkeypatch.setattr(device, "cgroup_cpu_quota", lambda: None)
    assert device.host_cores() == 4
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(device, "cgroup_cpu_quota", lambda: 1.0)
    assert DevicePlan.resolve(EngineConfig(device="cpu")).num_threads == 1   # torch would have started 4
