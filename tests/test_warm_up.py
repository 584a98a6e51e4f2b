"""Warm-up at load (engine/worker/warm_up.py): on the CPU, that its steps reach every kind of batch the kernels
specialize on; on a GPU (-m gpu), that after it no request compiles a Triton kernel."""
import pytest
import torch

from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.worker.warm_up import warm_up


def _record_steps(runner):
    """Make runner record the context of each step it executes."""
    contexts, execute = [], runner.execute
    runner.execute = lambda step: contexts.append(step.context) or execute(step)
    return contexts


def test_warm_up_reaches_every_kind_of_batch(tiny_checkpoint):
    engine = LLMEngine(EngineConfig(model_path=str(tiny_checkpoint), device="cpu", dtype="float32", max_num_seqs=12,
                                    kv_cache_memory_bytes=4 << 20))
    contexts = _record_steps(engine.runner)
    encoded = []
    encode = engine.model.encode_images
    engine.model.encode_images = lambda px: encoded.append(px.shape) or encode(px)
    seconds = warm_up(engine.runner, engine.model, engine.config.max_num_seqs)
    assert seconds > 0 and len(encoded) == 1
    prefills = [(c.seqlens_q, c.seqlens_k) for c in contexts if c.is_prefill and c.decodes is None]
    assert any(k > q and (k - q) % engine.block_size for qs, ks in prefills for q, k in zip(qs, ks)), \
        "a chunk after a cached prefix that ends mid-block"
    assert any(q > 64 for qs, _ in prefills for q in qs), "a prompt longer than one query tile"
    assert any(c.decodes is not None for c in contexts), "a mixed step"
    decodes = {len(c.seqlens_k) for c in contexts if not c.is_prefill}
    assert decodes == {1, 12}, decodes                                # eager decode, split and whole context


def _compiled_variants() -> dict[str, int]:
    from bunny_backend.ops import triton_fused, triton_paged_decode, triton_prefill
    kernels = {name: fn for module in (triton_fused, triton_paged_decode, triton_prefill)
               for name, fn in vars(module).items() if name.endswith("_kernel")}
    return {name: sum(len(cache[0]) for cache in fn.device_caches.values()) for name, fn in kernels.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_kernel_compiles_after_load_on_gpu(checkpoint_factory, test_images):
    """Text and image requests, staggered (batch sizes 1 to 12, prefill, mixed and decode steps, prefix-cache
    hits): the Triton kernels compiled at load are all they use."""
    from engine_helpers import run_all, twelve_requests
    path = str(checkpoint_factory(seed=5, num_kv_heads=2))
    engine = LLMEngine(EngineConfig(model_path=path, device="cuda", dtype="bfloat16", kv_cache_memory_bytes=8 << 20,
                                    max_num_batched_tokens=64))
    before = _compiled_variants()
    results = run_all(engine, twelve_requests(test_images))
    after = _compiled_variants()
    print(f"\nTriton kernel variants compiled at load: {before}")
    assert all(ids for ids, _, _ in results.values())
    assert after == before, {name: (before[name], after[name]) for name in after if after[name] != before[name]}
