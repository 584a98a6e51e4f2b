"""Tensor parallelism on the CPU (gloo): sharding plan, sharded loading, and TP=2 engines against TP=1 and the
transformers reference (greedy tokens, text and image, MHA and GQA; prefill logits in fp32), KV capacity, memory per
rank. A worker that dies: test_tp_worker_death.py (one tensor-parallel engine per process at a time)."""
import json
import subprocess
import sys

import pytest
import torch

from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.executor.step_channel import StepInputs, decode, encode
from bunny_backend.io.tokenizer import eos_token_ids, load_tokenizer
from bunny_backend.model.config import TextConfig
from bunny_backend.model.loader import load_model
from bunny_backend.model.sharding import Shard, TextShards
from bunny_backend.tools.reference import ReferenceBunny
from bunny_backend.utils.context import ForwardContext, paged_context
from bunny_backend.utils.distributed import TensorParallel
from engine_helpers import QUESTIONS, make_engine, run_all
from model_helpers import dense_prefill_context, expand, pixels_of, prompt_ids
from reliability_report import record

CHECKPOINTS = {
    # heads, KV heads and vocabulary (1536) divide by 2; tied embeddings: one vocabulary-parallel matrix
    "mha-even": dict(seed=21, num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
    # one KV head, replicated on both ranks; a vocabulary of 1537 rows, padded to 2 x 769
    "gqa-replicated-kv-odd-vocab": dict(seed=22, num_heads=4, num_kv_heads=1, vocab_size=1537),
}


def text_config(**kw) -> TextConfig:
    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1, vocab_size=100)
    return TextConfig(**{**base, **kw})


# ---- the plan (no processes) -------------------------------------------------------------------------------
def test_plan_splits_replicates_or_refuses():
    even = [TextShards.plan(text_config(num_key_value_heads=2), TensorParallel(r, 2)) for r in range(2)]
    assert [(s.num_heads, s.num_kv_heads, s.kv_head_start) for s in even] == [(2, 1, 0), (2, 1, 1)]
    replicated = [TextShards.plan(text_config(num_key_value_heads=2), TensorParallel(r, 4)) for r in range(4)]
    assert [(s.num_heads, s.num_kv_heads, s.kv_head_start) for s in replicated] == [(1, 1, 0), (1, 1, 0),
                                                                                     (1, 1, 1), (1, 1, 1)]
    odd_vocab = [TextShards.plan(text_config(vocab_size=101), TensorParallel(r, 2)) for r in range(2)]
    assert [s.vocab("lm_head")["lm_head"] for s in odd_vocab] == [Shard(0, 0, 51, 101), Shard(0, 51, 50, 101)]
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 does not divide the model's num_attention_heads "
                                         r"\(3\).*intermediate_size \(129\)"):
        TextShards.plan(text_config(hidden_size=48, num_attention_heads=3, intermediate_size=129), TensorParallel(0, 2))
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3; fewer KV heads than ranks works"):
        TextShards.plan(text_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3),
                        TensorParallel(0, 2))


def test_step_channel_round_trips_prefill_decode_and_mixed_steps():
    i32 = torch.int32
    prefill = ForwardContext(is_prefill=True, cu_seqlens_q=torch.tensor([0, 3, 5], dtype=i32), max_seqlen_q=3,
                             slot_mapping=torch.arange(5), block_tables=torch.tensor([[0, -1], [1, 2]], dtype=i32),
                             seqlens_q=[3, 2], seqlens_k=[3, 9])
    decoding = ForwardContext(is_prefill=False, slot_mapping=torch.tensor([7, 40]), seqlens_k=[8, 41],
                              context_lens=torch.tensor([8, 41], dtype=i32),
                              block_tables=torch.tensor([[0], [2]], dtype=i32))
    mixed = paged_context([1, 1, 3], [8, 41, 5], [[0], [2, 3, 4], [5]], torch.tensor([7, 40, 80, 81, 82]), 2)

    def assert_same(got, want, where):
        for name, value in vars(want).items():
            have = getattr(got, name)
            if isinstance(value, ForwardContext):
                assert_same(have, value, f"{where}.{name}")
            elif isinstance(value, torch.Tensor):
                assert torch.equal(have, value) and have.dtype == value.dtype, f"{where}.{name}"
            else:
                assert have == value and type(have) is type(value), f"{where}.{name}"

    for ctx, rows in ((prefill, [2, 4]), (decoding, [0, 1]), (mixed, [0, 1, 4])):
        n = len(ctx.slot_mapping)
        step = StepInputs(torch.arange(n) + 10, torch.arange(n), ctx, rows, torch.zeros(3, 4))
        got, num_images = decode(encode(step), torch.device("cpu"))
        assert num_images == 3 and got.logit_rows == rows and got.image_embeds is None   # features: a broadcast
        assert torch.equal(got.input_ids, step.input_ids) and torch.equal(got.positions, step.positions)
        assert_same(got.context, ctx, "context")
    assert got.context.decodes.seqlens_k == [8, 41] and got.context.prefills.seqlens_q == [3]


def test_engine_refuses_sizes_that_do_not_divide_before_starting_workers(checkpoint_factory):
    path = checkpoint_factory(seed=23, hidden_size=48, num_heads=3, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 does not divide the model's num_attention_heads"):
        make_engine(path, tensor_parallel_size=2)


def test_rank_shards_reassemble_the_checkpoint(checkpoint_factory):
    """Each rank loads only its slice; put together they are the whole model (padding rows zero)."""
    path = checkpoint_factory(**CHECKPOINTS["gqa-replicated-kv-odd-vocab"])
    full = load_model(path)
    ranks = [load_model(path, tp=TensorParallel(r, 2)) for r in range(2)]
    f_attn, attn = full.model.layers[0].self_attn, [m.model.layers[0].self_attn for m in ranks]
    q, kv = f_attn.q_size, f_attn.kv_size
    f_q, f_k, f_v = f_attn.qkv_proj.weight.split([q, kv, kv])
    r_q, r_k, r_v = zip(*(a.qkv_proj.weight.split([q // 2, kv, kv]) for a in attn))
    assert torch.equal(torch.cat(r_q), f_q)
    assert all(torch.equal(k, f_k) and torch.equal(v, f_v) for k, v in zip(r_k, r_v))   # the one KV head, twice
    assert torch.equal(torch.cat([a.o_proj.weight for a in attn], dim=1), f_attn.o_proj.weight)
    f_mlp, mlp = full.model.layers[0].mlp, [m.model.layers[0].mlp for m in ranks]
    assert torch.equal(torch.cat([m.down_proj.weight for m in mlp], dim=1), f_mlp.down_proj.weight)
    gate, up = zip(*(m.gate_up_proj.weight.chunk(2) for m in mlp))
    assert torch.equal(torch.cat(gate + up), f_mlp.gate_up_proj.weight)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = torch.cat([dict(m.named_parameters())[name] for m in ranks])
        assert rows.shape[0] == 1538 and torch.equal(rows[:1537], dict(full.named_parameters())[name])
        assert not rows[1537:].any()
    assert ranks[0].has_vision and not ranks[1].has_vision
    assert not any(n.startswith(("model.vision_tower.", "model.mm_projector.")) for n, _ in ranks[1].named_parameters())


# ---- TP=2 engines against TP=1 and the reference -----------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def engines(request, checkpoint_factory):
    """(checkpoint, TP=1 engine, TP=2 engine); one TP engine per process at a time, so one pair per checkpoint."""
    path = checkpoint_factory(**CHECKPOINTS[request.param])
    one, two = make_engine(path), make_engine(path, tensor_parallel_size=2)
    yield path, one, two
    two.shutdown()


def mixed_requests(test_images):
    return [(0, "text", QUESTIONS[0], [], SamplingParams(max_tokens=24)),
            (0, "image", QUESTIONS[1], [test_images[0]], SamplingParams(max_tokens=24)),
            (1, "chinese", QUESTIONS[2], [], SamplingParams(max_tokens=16)),
            (3, "wide-image", QUESTIONS[5], [test_images[1]], SamplingParams(max_tokens=16))]


def test_greedy_tokens_equal_tp1_and_the_reference(engines, test_images):
    path, one, two = engines
    reqs = mixed_requests(test_images)
    got_one, got_two = run_all(one, reqs), run_all(two, reqs)
    assert got_two == got_one
    ref, tok = ReferenceBunny.from_pretrained(path), load_tokenizer(path)
    for _, rid, text, images, params in reqs:
        ids = prompt_ids(tok, text, bool(images))
        expected = ref.generate_greedy(ids, ref.pixel_values(images), max_new_tokens=params.max_tokens,
                                       eos_token_ids=eos_token_ids(path, tok))
        assert got_two[rid][0] == expected, rid
    assert two.stats().kv_blocks_used == 0


def prefill_logits(engine, ids, image) -> torch.Tensor:
    """Logits of every row of one prompt's prefill, run on every rank of `engine` (no KV cache writes)."""
    full = torch.tensor(expand(ids, engine.model.num_image_tokens))
    embeds = None
    if image is not None:
        with torch.inference_mode():
            embeds = engine.model.encode_images(pixels_of(image, engine.model.config.vision.image_size))[0]
    step = StepInputs(full, torch.arange(len(full)), dense_prefill_context(len(full)), list(range(len(full))), embeds)
    return engine.runner.execute(step)


def test_prefill_logits_equal_tp1_in_fp32(engines, test_images):
    path, one, two = engines
    tok = load_tokenizer(path)
    for text, image in ((QUESTIONS[3], None), (QUESTIONS[1], test_images[2])):
        ids = prompt_ids(tok, text, image is not None)
        torch.testing.assert_close(prefill_logits(two, ids, image), prefill_logits(one, ids, image),
                                   atol=1e-4, rtol=0)


def test_each_rank_caches_its_own_kv_heads(engines):
    path, one, two = engines
    kv_heads = one.model.config.text.num_key_value_heads
    assert two.runner.kv_caches[0][0].shape[2] == max(1, kv_heads // 2)
    # the same per-rank budget (kv_cache_memory_bytes) holds twice the blocks when the KV heads split
    assert two.runner.num_blocks == (2 if kv_heads % 2 == 0 else 1) * one.runner.num_blocks


# ---- memory per rank ---------------------------------------------------------------------------------------
MEMORY_SCRIPT = r"""
import json, sys
from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
engine = LLMEngine(EngineConfig(model_path=sys.argv[1], device="cpu", dtype="float32",
                                tensor_parallel_size=int(sys.argv[2]),
                                kv_cache_memory_bytes=1 << 20, max_num_batched_tokens=64))
print(json.dumps(engine.memory_reports))
engine.shutdown()
"""


def memory_reports(path, tp: int) -> list[dict]:
    """Each rank's memory report, measured in fresh processes (the test process's allocator would blur it)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), str(tp)], capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_each_rank_holds_about_half_the_weights(checkpoint_factory):
    # the checkpoint of test_loader_memory: ~150 MB of LLM weights in fp32 beside a tiny vision tower
    path = checkpoint_factory(seed=7, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8,
                              intermediate_size=1536, vocab_size=16384)
    (one,), two = memory_reports(path, 1), memory_reports(path, 2)
    mib = lambda b: round(b / (1 << 20), 1)   # noqa: E731
    kinds = ("weights", "resident", "peak")
    record("tensor parallel memory (MiB)", **{f"tp1_{k}": mib(one[f"{k}_bytes"]) for k in kinds},
           **{f"tp2_rank{r}_{k}": mib(v[f"{k}_bytes"]) for r, v in enumerate(two) for k in kinds})
    for rank in two:
        assert 0.4 < rank["weights_bytes"] / one["weights_bytes"] < 0.6, (one, two)
        # One-sided, in the weights' bytes: sharding must save at least 35% of them in resident memory (half, less
        # what the rank repeats). No lower bound: a loaded machine that swaps or a kernel's page sizes move the
        # resident figure, not the parameter count checked above.
        assert rank["resident_bytes"] < one["resident_bytes"] - 0.35 * one["weights_bytes"], (one, two)

