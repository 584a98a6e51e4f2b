"""One mixed step through the model runner twice, padded in a mixed-step graph (engine/worker/mixed_graphs.py,
replayed eagerly by EagerCapture off the GPU) and unpadded in the eager path, from the same cache: decode rows after
prefixes that end mid-block, a fresh prompt with an image, a chunk that does not reach its prompt's end, and a chunk
after a cached prefix ending mid-block that holds the end of an image. The oracle is the eager step (its own
context, the split decode/prefill attention); the graph's logits must match it, its argmax must be its logits',
and the real cache slots it writes must hold what the eager step wrote.

Run in-process with the portable attention (tests/test_mixed_graphs.py), as a script under TRITON_INTERPRET=1 with
the CUDA backend's Triton kernels on CPU tensors (`python graph_step_cases.py CHECKPOINT`), and on a GPU with real
graph capture (test_mixed_graphs.py, -m gpu).
"""
from __future__ import annotations

import sys

import torch

from bunny_backend.engine.core.scheduler import SchedulerOutput
from bunny_backend.engine.core.sequence import IMAGE_TOKEN_INDEX, ImageSpan, Sequence
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.worker.graph_capture import Captured
from bunny_backend.engine.worker.model_runner import ModelRunner
from bunny_backend.model.loader import load_model
from bunny_backend.ops.attention import get_backend

BLOCK = 16
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class EagerCapture:
    """The graphs' capture contract without a GPU: replay() re-runs fn on the static buffers into the same output."""

    def capture(self, fn):
        out = fn()
        return Captured(lambda: out.copy_(fn()), out)


def _seq(name, n, image=None):
    ids = [(7 * i + len(name)) % 200 + 3 for i in range(n)]
    images = []
    if image is not None:
        offset, length, embeds = image
        ids[offset:offset + length] = [IMAGE_TOKEN_INDEX] * length
        images = [ImageSpan(offset, length, name.encode(), None, embeds)]
    return Sequence(name, ids, SamplingParams(), images)


def scenario(hidden: int, gen: torch.Generator, scale: int = 1):
    """(sequences with block tables, cached tokens before the step, new tokens in the step), decode rows first."""
    image = lambda length: torch.randn(length, hidden, generator=gen) * 0.5   # noqa: E731
    spec = [("decode-a", 38 * scale, 37 * scale, 1, None), ("decode-b", 20 * scale, 19 * scale, 1, None),
            ("image", 30 * scale, 0, 30 * scale, (3, 8 * scale)),
            ("chunk", 50 * scale, 21 * scale, 20 * scale, None),
            ("image-tail", 25 * scale, 21 * scale, 4 * scale, (18 * scale, 6 * scale))]
    seqs, cached, new, next_block = [], [], [], 0
    for name, total, c, n, img in spec:
        seq = _seq(name, total, None if img is None else (img[0], img[1], image(img[1])))
        need = -(-total // BLOCK)
        seq.block_table = [next_block + 2 * i for i in range(need)]   # non-contiguous: every other block
        next_block += 2 * need + 1
        seqs.append(seq)
        cached.append(c)
        new.append(n)
    return seqs, cached, new


def _step(runner, seqs, num_new, num_decodes):
    return runner.run(SchedulerOutput(seqs=seqs, num_decodes=num_decodes, num_new_tokens=num_new))


def _record(runner):
    """The logits (and the graph's argmax) of the rows each step samples."""
    seen = {}
    sample, choose = runner._sample, runner._choose

    def on_sample(logits, seqs, want):
        seen["logits"] = logits.float().cpu().clone()
        return sample(logits, seqs, want)

    def on_choose(logits, tokens, seqs, want):
        seen["logits"] = logits[want].float().cpu().clone()
        seen["tokens"] = tokens[want].cpu().clone()
        return choose(logits, tokens, seqs, want)

    runner._sample, runner._choose = on_sample, on_choose
    return seen


def check_mixed_step(checkpoint, backend_name: str, dtype: torch.dtype, device: str, capture, scale: int = 1,
                     max_tokens: int = 128, max_seqs: int = 6):
    torch.manual_seed(0)
    model = load_model(checkpoint, dtype, torch.device(device))
    hidden = model.model.embed_tokens.weight.shape[1]
    seqs, cached, new = scenario(hidden, torch.Generator().manual_seed(1), scale)
    for s in seqs:
        for im in s.images:
            im.embeds = im.embeds.to(dtype=dtype, device=device)
    num_blocks = max(b for s in seqs for b in s.block_table) + 1
    runner = ModelRunner(model, get_backend(backend_name), num_blocks, BLOCK, torch.device(device), dtype,
                         graph_capture=capture, max_graph_batch=max_seqs, max_blocks_per_seq=num_blocks,
                         max_graph_tokens=max_tokens)
    assert runner.mixed_graphs is not None, "the mixed-step graphs were not captured"
    seen = _record(runner)
    graphs = runner.mixed_graphs
    # The cached prefixes, written by eager prefill chunks that do not reach their prompts' ends.
    runner.mixed_graphs = None
    with_prefix = [i for i, c in enumerate(cached) if c]
    _step(runner, [seqs[i] for i in with_prefix], [cached[i] for i in with_prefix], 0)
    for s, c in zip(seqs, cached):
        s.num_cached_tokens = c
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]

    eager_out = _step(runner, seqs, new, num_decodes=2)
    eager_logits = seen.pop("logits")
    eager_cache = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    for (k, v), (k0, v0) in zip(runner.kv_caches, before):
        k.copy_(k0)
        v.copy_(v0)
    runner.mixed_graphs = graphs
    replays = []
    for t, captured in graphs.graphs.items():
        replay = captured.replay
        captured.replay = lambda t=t, replay=replay: (replays.append(t), replay())
    graph_out = _step(runner, seqs, new, num_decodes=2)
    assert len(replays) == 1 and replays[0] >= sum(new), replays
    graph_logits, graph_tokens = seen["logits"], seen["tokens"]

    finals = [i for i, (s, c, n) in enumerate(zip(seqs, cached, new)) if c + n == s.num_tokens]
    assert [i for i, t in enumerate(graph_out.tokens) if t is not None] == finals
    assert graph_logits.shape == eager_logits.shape == (len(finals), graph_logits.shape[1])
    tol = TOLERANCE[dtype]
    err = (graph_logits - eager_logits).abs().max().item()
    assert err <= tol * max(1.0, eager_logits.abs().max().item()), f"logits differ by {err}"
    assert torch.equal(graph_tokens, graph_logits.argmax(-1)), "the graph's argmax is not its logits'"
    top2 = eager_logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * tol * max(1.0, eager_logits.abs().max().item())
    assert all(graph_out.tokens[i] == eager_out.tokens[i] for i, c in zip(finals, clear.tolist()) if c)
    if dtype == torch.float32:
        assert graph_out.tokens == eager_out.tokens
    real = num_blocks   # the scratch block, past the managed ones, is the graph's own
    for (k, v), (ke, ve) in zip(runner.kv_caches, eager_cache):
        for got, want in ((k, ke), (v, ve)):
            assert torch.allclose(got[:real].float(), want[:real].float(), atol=tol, rtol=tol), "cache differs"
    return len(replays)


if __name__ == "__main__":   # TRITON_INTERPRET=1: the CUDA backend's Triton kernels on CPU tensors
    check_mixed_step(sys.argv[1], "cuda", torch.float16, "cpu", EagerCapture())
    print("mixed-step graph in the Triton interpreter: ok")
