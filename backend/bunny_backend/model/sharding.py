"""How the Qwen2 decoder is cut over N tensor-parallel ranks (Megatron-style), and which slice of each checkpoint
tensor a rank reads.

- q/k/v and gate/up are column-parallel (each rank owns whole heads, and a slice of the MLP's columns); o and down
  are row-parallel (each rank multiplies its slice of the inputs, one all-reduce sums the partial outputs).
- KV heads: `num_key_value_heads` divisible by N splits them; fewer KV heads than ranks, with N a multiple of
  them, replicates each KV head on N / num_key_value_heads ranks (as vLLM does); anything else is refused.
- The embedding and the LM head are vocabulary-parallel: rank r owns rows [r*P, (r+1)*P) with P = ceil(V / N);
  the last rank's rows past V are padding (zeros, never looked up, cut from the gathered logits), so any
  vocabulary size works.
- `num_attention_heads` and `intermediate_size` must divide by N; otherwise loading fails naming the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

from bunny_backend.model.config import TextConfig
from bunny_backend.utils.distributed import TensorParallel


@dataclass(frozen=True, slots=True)
class Shard:
    """A rank's part of one checkpoint tensor: `length` indices from `start` along `dim` (of `total`), written at
    `offset` along the same dimension of the parameter (a fused parameter holds several tensors, e.g. q, k, v)."""
    dim: int
    start: int
    length: int
    total: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class TextShards:
    """One rank's sizes of the decoder."""
    tp: TensorParallel
    head_dim: int
    num_heads: int          # query heads on this rank
    num_kv_heads: int       # KV heads on this rank (its KV cache holds only these)
    kv_head_start: int      # the first of them in the checkpoint's numbering
    total_kv_heads: int
    intermediate_size: int  # MLP columns on this rank
    vocab_size: int         # the whole vocabulary
    vocab_rows: int         # rows of the embedding / LM head on each rank (padded)

    @classmethod
    def plan(cls, cfg: TextConfig, tp: TensorParallel) -> "TextShards":
        n, heads, kv = tp.size, cfg.num_attention_heads, cfg.num_key_value_heads
        problems = []
        if heads % n:
            problems.append(f"num_attention_heads ({heads})")
        if cfg.intermediate_size % n:
            problems.append(f"intermediate_size ({cfg.intermediate_size})")
        if kv % n and n % kv:
            problems.append(f"num_key_value_heads ({kv}; fewer KV heads than ranks works when the size is a "
                            "multiple of them: each KV head is then replicated)")
        if problems:
            raise ValueError(f"tensor_parallel_size {n} does not divide the model's {', '.join(problems)} "
                             "(config.json); choose a size that divides them")
        if kv % n == 0:
            local_kv, kv_start = kv // n, tp.rank * (kv // n)
        else:
            local_kv, kv_start = 1, tp.rank // (n // kv)
        return cls(tp=tp, head_dim=cfg.head_dim, num_heads=heads // n, num_kv_heads=local_kv,
                   kv_head_start=kv_start, total_kv_heads=kv, intermediate_size=cfg.intermediate_size // n,
                   vocab_size=cfg.vocab_size, vocab_rows=-(-cfg.vocab_size // n))

    # ---- checkpoint slices ---------------------------------------------------------------------------------
    def qkv(self) -> dict[str, Shard]:
        d, q, kv = self.head_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        kv_total = self.total_kv_heads * d
        return {"q_proj": Shard(0, self.tp.rank * q, q, q * self.tp.size),
                "k_proj": Shard(0, self.kv_head_start * d, kv, kv_total, offset=q),
                "v_proj": Shard(0, self.kv_head_start * d, kv, kv_total, offset=q + kv)}

    def o_proj(self) -> dict[str, Shard]:
        q = self.num_heads * self.head_dim
        return {"o_proj": Shard(1, self.tp.rank * q, q, q * self.tp.size)}

    def gate_up(self) -> dict[str, Shard]:
        m = self.intermediate_size
        return {"gate_proj": Shard(0, self.tp.rank * m, m, m * self.tp.size),
                "up_proj": Shard(0, self.tp.rank * m, m, m * self.tp.size, offset=m)}

    def down_proj(self) -> dict[str, Shard]:
        m = self.intermediate_size
        return {"down_proj": Shard(1, self.tp.rank * m, m, m * self.tp.size)}

    @property
    def vocab_start(self) -> int:
        return self.tp.rank * self.vocab_rows

    def vocab(self, name: str) -> dict[str, Shard]:
        """The embedding's or the LM head's rows; the padding past the vocabulary is not read."""
        rows = max(0, min(self.vocab_rows, self.vocab_size - self.vocab_start))
        return {name: Shard(0, self.vocab_start, rows, self.vocab_size)}
