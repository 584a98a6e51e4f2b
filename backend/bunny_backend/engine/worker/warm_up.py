"""Warm-up at load: every kernel specialization a step can reach runs once before the model says READY, so no
request's latency includes a Triton compile or a library's first-use setup (issue #29: the first batch of 10 had a
942 ms mean TTFT on an H200, four times a warm one).

What runs: the vision tower on one image; a varlen prefill over a fresh prompt longer than a query tile and a
chunk after a cached prefix that ends mid-block; a mixed step (decode rows and a chunk); eager decode at batch 1
and at max_num_seqs (the split-context and whole-context variants of the decode kernel); the LM head over each
step's output rows: the eager path, which a step takes when graphs are off or it does not fit them. The graphs were
captured before, in the model runner, each size run once outside its graph first (Triton compiles, cuBLAS picks):
decode steps at every padded batch size (decode_graphs.py) and the other steps at every token count of the ladder
up to the step budget (mixed_graphs.py); the log gives each capture's time.

Token ids are 0 and K/V go to the first blocks of the still empty cache: the block manager hands those out later,
and a sequence's K/V are written before anything reads them (a prefix-cache hash is registered only after).
"""
from __future__ import annotations

import time

import torch

from bunny_backend.engine.executor.step_channel import StepInputs
from bunny_backend.utils.context import paged_context, token_slots

# (cached, new) per sequence, decode rows first: the batches the warm-up steps run (block size 16 in the comments)
PREFILL = [(0, 70), (21, 9)]            # a prompt over two query tiles; a chunk after a prefix ending mid-block
MIXED = [(9, 1), (30, 1), (0, 12)]      # two decode rows and a fresh chunk


def _step(runner, spans: list[tuple[int, int]], num_decodes: int, first_block: int = 0) -> None:
    """One forward over `spans`, each sequence on its own consecutive blocks from first_block (or all on that one
    block when the batch is a decode of one-block contexts)."""
    bs = runner.block_size
    tables, block = [], first_block
    for cached, new in spans:
        need = -(-(cached + new) // bs)
        tables.append(list(range(block, block + need)))
        block += need if num_decodes < len(spans) else 0
    slots = sum((token_slots(t, c, c + n, bs) for t, (c, n) in zip(tables, spans)), [])
    positions = sum((list(range(c, c + n)) for c, n in spans), [])
    device = runner.device
    ctx = paged_context([n for _, n in spans], [c + n for c, n in spans], tables,
                        torch.tensor(slots, dtype=torch.int64, device=device), num_decodes,
                        finals=[True] * len(spans))
    logit_rows = [sum(n for _, n in spans[:i + 1]) - 1 for i in range(len(spans))]
    runner.execute(StepInputs(torch.zeros(len(positions), dtype=torch.int64, device=device),
                              torch.tensor(positions, dtype=torch.int64, device=device), ctx, logit_rows))


def blocks_needed(block_size: int) -> int:
    return max(sum(-(-(c + n) // block_size) for c, n in spans) for spans in (PREFILL, MIXED))


@torch.inference_mode()
def warm_up(runner, model, max_num_seqs: int) -> float:
    """Run the warm-up steps on `runner` (a ModelRunner) and `model` (its BunnyForCausalLM); the seconds taken.
    Steps that need more cache blocks than the runner has are left out."""
    t0 = time.perf_counter()
    size = model.config.vision.image_size
    model.encode_images(torch.zeros(1, 3, size, size, device=runner.device))
    if runner.num_blocks >= blocks_needed(runner.block_size):
        _step(runner, PREFILL, num_decodes=0)
        _step(runner, MIXED, num_decodes=2)
        for batch in sorted({1, max_num_seqs}):
            _step(runner, [(4, 1)] * batch, num_decodes=batch)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - t0
