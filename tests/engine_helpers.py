"""Driving the engine in-process for the engine-level tests: one engine per test, arrivals by step."""
from __future__ import annotations

from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.sampling_params import SamplingParams

QUESTIONS = ["What is a rabbit?", "Describe the image.", "请描述这张图片。", "How many cats are there?",
             "Tell me a story about the sea.", "图中有什么？"]


def make_engine(model_path, **kw):
    kw.setdefault("kv_cache_memory_bytes", 8 << 20)
    kw.setdefault("max_num_batched_tokens", 64)   # forces chunked prefill of image prompts
    kw.setdefault("dtype", "float32")   # exact token comparisons; auto may pick bf16 on CPUs that have it natively
    return LLMEngine(EngineConfig(model_path=str(model_path), device="cpu", **kw))


def run_all(engine, arrivals, max_steps=10_000):
    """arrivals: list of (step, request_id, text, images, params). Returns {id: (ids, text, reason)}."""
    results = {rid: ([], "", None) for _, rid, *_ in arrivals}
    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, text, images, params = pending.pop(0)
            engine.add_request(rid, text, images, params)
        for out in engine.step():
            ids, text, _ = results[out.request_id]
            results[out.request_id] = (ids + out.delta_token_ids, text + out.delta_text, out.finish_reason)
        step += 1
        assert step < max_steps
    return results


def twelve_requests(test_images):
    reqs = []
    for i in range(12):
        image = [test_images[i % len(test_images)]] if i % 3 else []
        reqs.append((i // 2, f"r{i}", QUESTIONS[i % len(QUESTIONS)], image, SamplingParams(max_tokens=4 + 3 * i)))
    return reqs
