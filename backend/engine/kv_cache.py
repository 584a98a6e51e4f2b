"""Size and allocate the paged KV cache after the weights are loaded."""
from __future__ import annotations

import torch

from bunny_backend.config import EngineConfig
from bunny_backend.model.config import TextConfig


def bytes_per_block(text: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * block_size * text.num_key_value_heads * text.head_dim * elem


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return torch.npu.mem_get_info(device)[0]   # type: ignore[attr-defined]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


def num_kv_blocks(cfg: EngineConfig, text: TextConfig, block_size: int, max_model_len: int,
                  dtype: torch.dtype, device: torch.device, workspace_bytes: int = 0) -> int:
    """Blocks that fit the budget once the attention backend's workspace is taken out of it, capped at what
    max_num_seqs full-length sequences could ever use."""
    budget = cfg.kv_cache_memory_bytes or int(available_memory(device) * cfg.kv_cache_memory_fraction)
    blocks = (budget - workspace_bytes) // bytes_per_block(text, block_size, dtype)
    cap = cfg.max_num_seqs * -(-max_model_len // block_size)
    blocks = min(blocks, cap)
    if blocks < 1:
        raise ValueError(f"KV cache budget of {budget} bytes ({workspace_bytes} of them for the attention "
                         f"backend's workspace) holds no block of {block_size} tokens; raise kv_cache_memory_bytes "
                         "or kv_cache_memory_fraction")
    return blocks
