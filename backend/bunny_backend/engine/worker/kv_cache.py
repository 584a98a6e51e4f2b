"""Size and allocate the paged KV cache after the weights are loaded."""
from __future__ import annotations

import dataclasses
import logging

import torch

from bunny_backend.config import EngineConfig
from bunny_backend.model.config import TextConfig

log = logging.getLogger("bunny.engine")


def bytes_per_block(text: TextConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int = 0) -> int:
    """num_kv_heads: the KV heads this rank holds (0: all of the model's)."""
    elem = torch.empty((), dtype=dtype).element_size()
    heads = num_kv_heads or text.num_key_value_heads
    return 2 * text.num_hidden_layers * block_size * heads * text.head_dim * elem


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return torch.npu.mem_get_info(device)[0]   # type: ignore[attr-defined]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


def num_kv_blocks(cfg: EngineConfig, text: TextConfig, block_size: int, max_model_len: int,
                  dtype: torch.dtype, device: torch.device, workspace_bytes: int = 0, num_kv_heads: int = 0,
                  encoder_cache_bytes: int = 0) -> int:
    """Blocks that fit the budget once the attention backend's workspace is taken out of it, capped at what
    max_num_seqs full-length sequences could ever use. The budget is per tensor-parallel rank, each rank holding
    its own KV heads (num_kv_heads); ranks on the CPU share the host's memory, so they share its fraction.

    The memory plan: kv_cache_memory_bytes is the KV cache's size, workspace included; without it,
    kv_cache_memory_fraction of the memory free after loading the weights holds the KV cache (workspace included)
    and, on the rank that holds it (rank 0), the encoder cache (encoder_cache_bytes) together.
    """
    budget = cfg.kv_cache_memory_bytes
    if not budget:
        share = cfg.tensor_parallel_size if device.type == "cpu" else 1
        budget = int(available_memory(device) * cfg.kv_cache_memory_fraction / share) - encoder_cache_bytes
    blocks = max(budget - workspace_bytes, 0) // bytes_per_block(text, block_size, dtype, num_kv_heads)
    cap = cfg.max_num_seqs * -(-max_model_len // block_size)
    blocks = min(blocks, cap)
    if blocks < 1:
        raise ValueError(f"KV cache budget of {budget} bytes ({workspace_bytes} of them for the attention "
                         f"backend's workspace) holds no block of {block_size} tokens; raise kv_cache_memory_bytes "
                         "or kv_cache_memory_fraction (or lower encoder_cache_bytes)")
    return blocks


def fit_max_num_seqs(config: EngineConfig, kv_tokens: int, max_model_len: int, device: torch.device,
                     asked: bool) -> EngineConfig:
    """The memory plan's last word: how many full-context sequences the KV cache holds, said in the log; an
    accelerator's own max_num_seqs is capped by it (at 16 at the least: most requests are far shorter than the
    context, and the scheduler preempts when blocks run out); one asked for in the config stands."""
    holds = max(1, kv_tokens // max_model_len)
    seqs = config.max_num_seqs
    if not asked and device.type != "cpu":
        seqs = min(seqs, max(holds, 16))
    log.info("bunny: KV cache of %d tokens holds %d sequences of the full context (%d tokens); max_num_seqs %d, "
             "max_queued_requests %d", kv_tokens, holds, max_model_len, seqs, config.max_queued_requests)
    return dataclasses.replace(config, max_num_seqs=seqs)
