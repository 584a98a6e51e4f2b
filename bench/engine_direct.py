"""Our engine called in-process: N requests added at once, `step()` until all finish; plus TTFT and KV accounting.

Run as a worker: `python -m bench.engine_direct MODEL_PATH WORKLOAD_JSON` prints one BENCH_RESULT line.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from bench.common import RequestTiming, Workload, emit, summarize, tree_peak_rss_bytes
from bench.images import RequestImages
from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.sampling_params import SamplingParams


class KVWatch:
    """After each step: blocks in use vs the blocks the live tokens need (ceil(tokens / block_size) per sequence)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.max_used = 0
        self.max_excess = 0           # used - need, worst step
        self.max_excess_per_seq = 0.0
        self.violations = 0           # steps where used > need + one block per sequence

    def check(self) -> None:
        eng = self.engine
        used = eng.stats().kv_blocks_used
        running = list(eng.scheduler.running)
        bs = eng.block_size
        need = sum(-(-s.num_tokens // bs) for s in running)
        self.max_used = max(self.max_used, used)
        excess = used - need
        self.max_excess = max(self.max_excess, excess)
        if running:
            self.max_excess_per_seq = max(self.max_excess_per_seq, excess / len(running))
        if excess > len(running):
            self.violations += 1

    def as_dict(self) -> dict:
        return {"kv_blocks_used_max": self.max_used, "kv_blocks_total": self.engine.stats().kv_blocks_total,
                "kv_block_size": self.engine.block_size, "kv_excess_blocks_max": self.max_excess,
                "kv_excess_blocks_per_seq_max": self.max_excess_per_seq, "kv_steps_over_need_plus_one": self.violations}


def make_engine(model_path: str, work: Workload, kv_cache_bytes: int, dtype: str) -> LLMEngine:
    cfg = EngineConfig(model_path=model_path, dtype=dtype, max_num_seqs=max(16, max(work.batch_sizes)),
                       kv_cache_memory_bytes=kv_cache_bytes, enable_prefix_caching=work.prefix_caching,
                       num_threads=work.threads, cuda_graphs=work.cuda_graphs,
                       tensor_parallel_size=work.tensor_parallel_size,
                       # only when asked: a --baseline revision's EngineConfig may predate the field
                       **({"quantization": work.quantization} if work.quantization != "none" else {}))
    return LLMEngine(cfg)


def run_round(engine: LLMEngine, work: Workload, n: int, max_tokens: int, kv: KVWatch | None, tag: str,
              images: RequestImages | None = None):
    """N requests at once until all finish: (wall seconds, their timings, the token ids of the first one). images:
    where each request's image comes from (None: the workload's one image)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    timings: dict[str, RequestTiming] = {}
    ids: dict[str, list[int]] = {}
    round_images = images.take(n) if images else [work.image] * n   # made before the clock starts
    t0 = time.perf_counter()
    for i in range(n):
        rid = f"{tag}-{i}"
        engine.add_request(rid, work.prompt, [round_images[i]], params)
        timings[rid] = RequestTiming(sent=t0)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            t = timings[out.request_id]
            if out.error:
                raise RuntimeError(f"{out.request_id}: {out.error}")
            t.record(now, len(out.delta_token_ids))
            if out.delta_token_ids:
                ids.setdefault(out.request_id, []).extend(out.delta_token_ids)
        if kv is not None:
            kv.check()
    return time.perf_counter() - t0, list(timings.values()), ids.get(f"{tag}-0", [])


def decode_rate(rounds) -> float | None:
    """Tokens/s after the first token: 1 / mean inter-token latency."""
    itls = [t.itl for _, ts in rounds for t in ts if t.itl]
    return len(itls) / sum(itls) if itls else None


def benchmark(model_path: str, work: Workload, kv_cache_bytes: int, dtype: str, log=print) -> dict:
    engine = make_engine(model_path, work, kv_cache_bytes, dtype)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kv = KVWatch(engine)
    images = RequestImages(work.image, work.distinct_images)
    for w in range(work.warmup):
        run_round(engine, work, 1, 8, None, f"warm{w}", images)
    # TTFT: one request with one image, max_tokens 1, best of 3 (median reported too)
    ttfts = sorted(run_round(engine, work, 1, 1, None, f"ttft{i}", images)[1][0].ttft for i in range(3))
    rows, decode_b1, first_ids = [], None, None
    for n in work.batch_sizes:
        results = [run_round(engine, work, n, work.max_tokens, kv, f"b{n}r{r}", images) for r in range(work.rounds)]
        first_ids = first_ids or results[0][2]
        rounds = [(wall, timings) for wall, timings, _ in results]
        rows.append(summarize(n, rounds).as_dict())
        r = rows[-1]
        if n == 1:
            decode_b1 = decode_rate(rounds)
        log(f"engine  batch {n:2d}: {r['output_tokens_per_s']:7.1f} tok/s  TTFT {r['ttft_mean_ms']:7.0f} ms  "
            f"ITL {r['itl_mean_ms']:6.1f} ms")
    if decode_b1 is None:                        # the roofline needs batch-1 decode even when 1 is not swept
        decode_b1 = decode_rate([run_round(engine, work, 1, work.max_tokens, None, "b1", images)[:2]])
    # peak RSS: this process and, under tensor parallelism, its worker ranks
    out = {"system": "engine", "rows": rows, "ttft_1image_s": ttfts[0], "ttft_1image_median_s": ttfts[1],
           "batch1_decode_tok_s": decode_b1, "peak_rss_bytes": tree_peak_rss_bytes(os.getpid()),
           "first_request_ids": first_ids, "tensor_parallel_size": work.tensor_parallel_size,
           "rank_memory": engine.memory_reports,
           **kv.as_dict(),
           "num_preemptions": engine.stats().num_preemptions, "distinct_images": images.count, "device": str(engine.device), "dtype": str(engine.dtype),
           "attention_backend": engine.runner.backend.name,
           "threads": torch.get_num_threads()}
    if engine.device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    engine.shutdown()
    return out


def main(argv: list[str]) -> None:
    model_path, work_json, kv_bytes, dtype = argv[0], argv[1], int(argv[2]), argv[3]
    work = Workload.from_json(work_json)
    if work.threads:
        torch.set_num_threads(work.threads)
    emit(benchmark(model_path, work, kv_bytes, dtype, log=lambda m: print(m, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    main(sys.argv[1:])
