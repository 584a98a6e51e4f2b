"""What the engine's configuration means on the device it runs on: the one home of the per-device policy.

`DevicePlan.resolve(config, placement)` picks the device (auto: npu > cuda > cpu), the dtype (auto: bfloat16 on
accelerators and on CPUs that have it natively, else float32), the KV block size (16, or 128 on the NPU), the step
token budget (cuda_step_tokens on CUDA, else 4096), the prompt tokens a step may carry while streams decode (128
on the CPU, 2048 on accelerators), the attention backend (the
device's own) and the CPU threads. After loading, `prepare_model` gives the weights the device's layout (packed
linears on the CPU where oneDNN takes the dtype), and `graph_capture` says whether decode steps can be captured as
CUDA graphs (device cuda with the Triton paged-decode kernel, one rank).

Several engines on one host (Triton instances, tensor-parallel ranks): an engine whose first device is d (its
Placement) runs tensor-parallel rank r on device d + r; on the CPU they split the cores between them.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from dataclasses import dataclass

import torch

from bunny_backend.config import EngineConfig
from bunny_backend.engine.worker.graph_capture import GraphCapture
from bunny_backend.model.cpu_decode import use_cpu_decode_loop
from bunny_backend.model.cpu_layout import use_cpu_linears, use_fused_cpu_ops
from bunny_backend.model.loader import DTYPES
from bunny_backend.model.quantized_linear import quantize_model
from bunny_backend.utils.cpu_features import CpuFeatures, detect

log = logging.getLogger("bunny.engine")


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)
    return torch.npu.is_available()   # type: ignore[attr-defined]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "npu" if npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    if name == "npu" and not npu_available():
        raise ValueError("device 'npu' requested but torch_npu is not installed or sees no NPU")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (to time it); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize()   # type: ignore[attr-defined]


def resolve_dtype(name: str, device: torch.device, cpu: CpuFeatures | None = None) -> torch.dtype:
    """`auto`: bfloat16 on accelerators, `cpu_auto_dtype` on the CPU. A half dtype the CPU's oneDNN cannot take
    runs on the unpacked weight layout (model/cpu_layout.py): slower than float32, so it is said once here."""
    if device.type != "cpu":
        return torch.bfloat16 if name == "auto" else DTYPES[name]
    cpu = cpu or detect()
    if name == "auto":
        return cpu_auto_dtype(cpu)
    dtype = DTYPES[name]
    if not cpu.can_pack(dtype):
        log.warning("bunny: dtype %s on this CPU (vector ISA %s, flags %s) runs on plain matmuls: oneDNN's %s "
                    "kernels need AVX512BW (bf16) or AVX512-FP16/AMX-FP16 (fp16), so expect it to be slower than "
                    "float32", name, cpu.isa, " ".join(sorted(cpu.flags)) or "unknown", name)
    return dtype


def check_quantization(method: str, device: torch.device) -> None:
    """fp8 needs `torch._scaled_mm` on E4M3, which takes CUDA with compute capability 8.9 (Ada, Hopper) or later."""
    if method != "fp8":
        return
    if device.type != "cuda":
        raise ValueError(f"quantization fp8 needs a CUDA device with compute capability >= 8.9; this engine runs on "
                         f"{device.type} (on the CPU choose quantization int8)")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"quantization fp8 needs a CUDA device with compute capability >= 8.9; "
                         f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]} (choose "
                         "quantization none or int8)")


def cpu_auto_dtype(cpu: CpuFeatures) -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX) and oneDNN packs it, else float32.

    Measured on a 2-core AVX512-BF16 EPYC without AMX (`python -m bench.cpu_dtypes`, docs/performance.md "CPU dtypes"):
    bf16 decode reads half the weight bytes and ran 1.7-2.3x float32's tokens/s at batch 1, 1.05-1.1x at batch 10,
    with teacher-forced logits within the bf16 tolerance of the float32 reference (tests/test_cpu_dtype.py). Without
    native bf16 oneDNN emulates it (AVX512BW) or cannot run it (AVX2), and float32 stays the choice."""
    return torch.bfloat16 if cpu.native_bf16 and cpu.can_pack(torch.bfloat16) else torch.float32


def cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def cuda_step_tokens(num_sms: int) -> int:
    """The CUDA default step token budget: 64 tokens per SM as a power of two, within 4096..16384 (8192 on a
    132-SM H100/H200, 4096 on a 108-SM A100). With every step in a graph (mixed_graphs.py) a bigger step costs about
    its tokens' compute and no more launches, so the budget is what keeps a burst of prompts (128 image prompts are
    ~100k tokens) to few steps, while max_prefill_tokens_while_decoding still bounds what a step adds to running
    streams' gaps. A first rule, not yet measured: bench/gpu_check.sh's prefill-burst step is the figure to set it by
    (issue #29)."""
    tokens = 1 << max(1, 64 * num_sms).bit_length() - 1
    return min(16384, max(4096, tokens))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one engine sits among the engines of a host (model.py reads it from Triton's instance)."""
    device_index: int | None = None   # its first device (Triton's KIND_GPU device id); None: the default device
    engines_per_host: int = 1         # engines sharing the host's CPU cores (Triton's instance count)


def host_cores() -> int:
    """The CPUs this process may use: its affinity, and no more than its cgroup's CPU quota (a container's
    `--cpus`); more threads than that only wait at OpenMP barriers for a descheduled peer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """CPUs' worth of time the cgroup (v2) may use, or None where it is unlimited or unknown."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class DevicePlan:
    device: torch.device
    dtype: torch.dtype
    block_size: int
    # Tokens a step carries, decodes and prompt chunks (EngineConfig 0: the device's own; cuda_step_tokens on CUDA).
    # On CUDA it is also the largest mixed-step graph (mixed_graphs.py).
    max_num_batched_tokens: int
    # Prompt tokens a step may carry while it decodes running streams (EngineConfig 0: the device's own). On the
    # CPU a step's cost grows with every prompt token, so chunks stay small (docs/performance.md, "Serving under load");
    # on accelerators a step of a few thousand prompt tokens costs little more than a decode step.
    max_prefill_tokens_while_decoding: int
    # Steps a newcomer's prompt is spread over while streams decode (EngineConfig 0: the device's own). On the CPU
    # a chunk's cost is its tokens', so even a 200-token image prompt in one step triples the streams' next gap;
    # spread over 8 steps it adds an eighth of its prefill to each (docs/performance.md, "Serving under load").
    prefill_chunks_while_decoding: int
    attention_backend: str     # torch, cuda or npu (ops.attention.get_backend)
    cuda_graphs: bool          # asked for (ignored off CUDA); graph_capture() says whether it can be done
    tensor_parallel_size: int = 1
    quantization: str = "none"   # EngineConfig.quantization, checked against the device
    num_threads: int = 0       # torch's CPU threads per rank; 0 leaves torch's default (all cores)
    # The engine may lower (and raise back) its thread count from measured steps (cpu_threads.py): on the CPU,
    # unless num_threads was given or tensor parallel ranks share the cores.
    adaptive_threads: bool = False
    # Sequences decoded together (EngineConfig 0: the device's own). On the CPU a step's cost grows with the batch
    # and 16 was measured (docs/performance.md); an accelerator's step costs about the same at 16 and at 256, so
    # it takes up to 256, as vLLM does, and the engine caps that by what the KV cache holds (kv_cache.py).
    max_num_seqs: int = 16
    # Requests waiting beyond max_num_seqs before "server busy" (EngineConfig 0: 256, or max_num_seqs if more).
    max_queued_requests: int = 256

    @classmethod
    def resolve(cls, config: EngineConfig, placement: Placement = Placement()) -> "DevicePlan":
        device = resolve_device(config.device)
        if device.type != "cpu" and (placement.device_index is not None or config.tensor_parallel_size > 1):
            device = torch.device(device.type, placement.device_index or 0)
        backend = config.attention_backend
        if backend == "auto":
            backend = device.type if device.type in ("cuda", "npu") else "torch"
        processes = placement.engines_per_host * config.tensor_parallel_size
        cores = host_cores()
        threads = config.num_threads or (max(1, cores // processes)
                                         if processes > 1 or cores < torch.get_num_threads() else 0)
        tokens = config.max_num_batched_tokens or (cuda_step_tokens(cuda_sm_count(device)) if device.type == "cuda"
                                                    else 4096)
        seqs = config.max_num_seqs or min(16 if device.type == "cpu" else 256, tokens)
        if tokens < seqs:   # else the last-admitted streams would never decode
            raise ValueError(f"max_num_batched_tokens ({tokens}) must be >= max_num_seqs ({seqs}): every running "
                             "sequence decodes a token each step")
        queued = config.max_queued_requests or max(256, seqs)
        check_quantization(config.quantization, device)
        return cls(device=device, dtype=resolve_dtype(config.dtype, device),
                   block_size=config.block_size or (128 if device.type == "npu" else 16),
                   max_num_batched_tokens=tokens,
                   max_prefill_tokens_while_decoding=(config.max_prefill_tokens_while_decoding
                                                      or (128 if device.type == "cpu" else 2048)),
                   prefill_chunks_while_decoding=(config.prefill_chunks_while_decoding
                                                  or (8 if device.type == "cpu" else 1)),
                   attention_backend=backend, cuda_graphs=config.cuda_graphs,
                   tensor_parallel_size=config.tensor_parallel_size, quantization=config.quantization,
                   num_threads=threads, max_num_seqs=seqs,
                   adaptive_threads=(device.type == "cpu" and not config.num_threads
                                     and config.tensor_parallel_size == 1),
                   max_queued_requests=queued)

    @property
    def warms_up(self) -> bool:
        """Whether the engine runs its warm-up steps at load (engine/worker/warm_up.py): on CUDA, where first uses
        compile Triton kernels; the CPU's kernels are built by `./build.sh setup`."""
        return self.device.type == "cuda"

    def for_rank(self, rank: int) -> "DevicePlan":
        """The plan of tensor-parallel rank `rank` of this engine: the next devices after rank 0's."""
        if self.device.type == "cpu" or rank == 0:
            return self
        return dataclasses.replace(self, device=torch.device(self.device.type, self.device.index + rank))

    def enter(self) -> None:
        """Make this plan the process's own: CPU threads, and the current accelerator (collectives use it)."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        if self.device.index is None:
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif self.device.type == "npu":
            torch.npu.set_device(self.device)   # type: ignore[attr-defined]

    def quantize(self, model) -> None:
        """Quantize the weights as asked for (model/quantized_linear.py), right after loading."""
        quantize_model(model, self.quantization)

    def prepare_model(self, model) -> None:
        """The weight layout the device runs fastest, applied in place after loading."""
        if self.device.type == "cpu":
            use_cpu_linears(model)
            use_fused_cpu_ops(model)
            use_cpu_decode_loop(model)
        elif self.device.type == "cuda":
            from bunny_backend.ops import triton_fused   # triton is imported on CUDA only
            if (ops := triton_fused.decoder_ops()) is not None:
                model.model.use_fused_ops(ops)

    def graph_capture(self, head_dim: int) -> GraphCapture | None:
        """torch.cuda graph capture when asked for and the decode attention can be captured, else None."""
        if not self.cuda_graphs or self.device.type != "cuda":
            return None
        if self.tensor_parallel_size > 1:
            log.warning("bunny: cuda_graphs is on but decode runs eagerly: not captured under tensor parallelism")
            return None
        from bunny_backend.ops.triton_support import attention_unsupported_for   # imports triton
        reason = (f"attention backend {self.attention_backend}" if self.attention_backend != "cuda" else
                  attention_unsupported_for(self.dtype, head_dim, self.block_size))
        if reason:
            log.warning("bunny: cuda_graphs is on but decode runs eagerly: %s", reason)
            return None
        return GraphCapture()
