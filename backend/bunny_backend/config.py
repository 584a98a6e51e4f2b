"""Engine configuration: one dataclass, built from `config.pbtxt` parameters or command-line flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

_DEVICES = ("auto", "cpu", "cuda", "npu")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_QUANTIZATIONS = ("none", "int8", "w8a8", "fp8")


@dataclass(slots=True)
class EngineConfig:
    model_path: str = ""
    device: str = "auto"            # auto picks npu > cuda > cpu
    dtype: str = "auto"             # auto: bfloat16 on accelerators and CPUs with native bf16, else float32
    # Weights quantized at load from the checkpoint (model/quantized_linear.py): none; int8 (per output channel,
    # weight-only accuracy; meant for the CPU); w8a8 (int8 with 8-bit activations, CPU with AVX512-VNNI); fp8 (E4M3
    # weights and per-token activations, CUDA with compute capability >= 8.9).
    quantization: str = "none"
    block_size: int = 0             # 0: 16 on cpu/cuda, 128 on npu
    max_num_seqs: int = 0           # 0: the device's own (engine/worker/device.py: 16 on cpu, up to 256 elsewhere)
    # Tokens per step: one per running decode, then prefill chunks. 0: the device's own (engine/worker/device.py:
    # 4096 on cpu and npu; on cuda 64 per SM as a power of two within 4096..16384, 8192 on an H100/H200).
    max_num_batched_tokens: int = 0
    # While a step decodes running streams, it carries at most this many prompt tokens (longer prompts are
    # chunked over several steps), so a long prompt delays each running stream's next token by one chunk, not by
    # its whole prefill. 0: the device's own (engine/worker/device.py: 128 on cpu, 2048 on cuda/npu).
    max_prefill_tokens_while_decoding: int = 0
    # While streams decode, a newcomer's prompt is spread over about this many steps (chunks of at least 32 tokens,
    # at most the bound above), so a short prompt, too, costs each running stream a fraction of its prefill per
    # token rather than one whole chunk. 0: the device's own (engine/worker/device.py: 8 on cpu, 1 on cuda/npu).
    prefill_chunks_while_decoding: int = 0
    max_images_per_encoder_batch: int = 4   # distinct images one step sends through the vision tower
    encoder_cache_bytes: int = 128 << 20    # image features kept by image content (LRU); 0: off
    max_model_len: int = 0          # 0: config.json's tokenizer_model_max_length, else max_position_embeddings
    kv_cache_memory_bytes: int = 0  # 0: use kv_cache_memory_fraction
    kv_cache_memory_fraction: float = 0.5  # of the memory free after loading the weights
    enable_prefix_caching: bool = True
    num_threads: int = 0            # CPU intra-op threads; 0: all cores, split between instances/ranks
    attention_backend: str = "auto"  # auto: the device's own (npu, cuda) or the portable torch one
    seed: int = 0                   # seeds the draw of a seed for each request that has none
    # Decode steps as CUDA graphs where they can run (device cuda with the Triton paged-decode kernel); ignored
    # elsewhere. Verified on an H200: same logits as eager decoding, about 5x its speed (docs/performance.md).
    cuda_graphs: bool = True
    # Shard the LLM over this many devices (processes) with torch.distributed: rank 0 is this engine, ranks
    # 1..N-1 worker processes it spawns (engine/executor/tp_group.py). Data parallelism is Triton's instance_group count.
    tensor_parallel_size: int = 1
    # Limits on what one request may ask for (a request beyond them gets an error naming the limit).
    max_image_bytes: int = 20 << 20        # encoded size of one image
    max_image_pixels: int = 64_000_000     # width x height, checked from the header before decoding
    max_text_bytes: int = 1 << 20          # text_input (or all messages) in UTF-8, checked before tokenizing
    max_images_per_request: int = 1        # Bunny-v1.0 was trained with one image per conversation
    max_prompt_tokens: int = 0             # image features counted; 0: the context length
    max_output_tokens: int = 0             # the largest max_tokens accepted; 0: the context length
    max_queued_requests: int = 0           # requests waiting beyond max_num_seqs, then "server busy"; 0: 256, or
                                           # max_num_seqs where that is more
    # Streaming: at most one response per this many tokens per stream after the first (fewer, larger messages).
    # A responder that falls behind merges a stream's tokens into its next response whatever this is.
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.attention_backend not in ("auto", "torch", "cuda", "npu"):
            raise ValueError(f"attention_backend must be auto, torch, cuda or npu, got {self.attention_backend!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}")
        for name in ("tensor_parallel_size", "max_images_per_encoder_batch", "stream_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < 0:
            raise ValueError(f"max_num_batched_tokens must be >= 0 (0: the device's own), got "
                             f"{self.max_num_batched_tokens}")
        if 0 < self.max_num_batched_tokens < self.max_num_seqs:   # else the last-admitted streams would never decode
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes a token each step")
        if self.block_size < 0 or (self.block_size and self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.kv_cache_memory_bytes < 0:
            raise ValueError("kv_cache_memory_bytes must be >= 0")
        for name in ("max_image_bytes", "max_image_pixels", "max_text_bytes", "max_images_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_num_seqs", "max_prompt_tokens", "max_output_tokens", "max_queued_requests",
                     "max_prefill_tokens_while_decoding", "prefill_chunks_while_decoding", "encoder_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "EngineConfig":
        """Build from string key/values (Triton `parameters`); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, raw in params.items():
            if key not in known:
                raise ValueError(f"unknown engine parameter {key!r}; known: {sorted(known)}")
            kwargs[key] = _parse(known[key], str(raw).strip())
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _parse(field: dataclasses.Field, raw: str):
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    try:
        if kind == "bool":
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"parameter {field.name!r}: cannot read {raw!r} as {kind}") from None
