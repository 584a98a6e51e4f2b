"""The persistent block-table rows (engine/worker/block_tables.py) against tables built naively from the sequences'
lists, over a randomized schedule run by the real block manager: joins (with prefix-cache hits), growth, preemption
and re-admission, finishes, steps over any subset in any order, and more sequences than rows (rows taken from
sequences that left, and the tensor grown)."""
import random

import pytest
import torch

from bunny_backend.engine.core.block_manager import BlockManager
from bunny_backend.engine.core.sequence import Sequence
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.worker.block_tables import BlockTables

BLOCK = 4


def naive(tables: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32).reshape(len(tables), width)


@pytest.mark.parametrize("seed", range(4))
def test_rows_equal_tables_built_from_the_lists(seed):
    rng = random.Random(seed)
    manager = BlockManager(num_blocks=200, block_size=BLOCK, enable_prefix_caching=True)
    max_blocks = 12
    tables = BlockTables(max_blocks, torch.device("cpu"), rows=3)
    running, preempted, steps = [], [], 0
    prompts = [[7] * 9, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [5] * 3]   # shared prefixes: cache hits on rejoin
    for _ in range(300):
        event = rng.random()
        if event < 0.2 and len(running) < 8:
            seq = Sequence(f"r{steps}", rng.choice(prompts) + [rng.randrange(50) for _ in range(rng.randrange(6))],
                           SamplingParams())
            if manager.can_allocate(seq):
                manager.allocate(seq)
                running.append(seq)
        elif event < 0.3 and preempted:
            seq = preempted.pop(rng.randrange(len(preempted)))
            if manager.can_allocate(seq):
                manager.allocate(seq)
                running.append(seq)
            else:
                preempted.append(seq)
        elif event < 0.4 and running:
            seq = running.pop(rng.randrange(len(running)))
            manager.free(seq)
            if rng.random() < 0.5:
                preempted.append(seq)   # else it finished
        for seq in running:   # decode growth, up to the row width
            if seq.num_blocks(BLOCK) < max_blocks and rng.random() < 0.7:
                seq.append_token(rng.randrange(50))
                if manager.can_append(seq):
                    manager.may_append(seq)
                else:
                    seq.token_ids.pop()
        if not running:
            continue
        step = rng.sample(running, rng.randrange(1, len(running) + 1))
        width = max(len(s.block_table) for s in step)
        rows = tables.rows(step)
        assert len(set(rows)) == len(step)
        want = [s.block_table for s in step]
        assert torch.equal(tables.gather(rows, width), naive(want, width)), f"step {steps}"
        assert torch.equal(tables.gather(rows, max_blocks), naive(want, max_blocks)), f"step {steps}"
        steps += 1
    assert steps > 150 and tables.table.shape[0] > 3   # it grew: a step held more sequences than rows


def test_gather_into_a_static_buffer_and_refusal():
    tables = BlockTables(4, torch.device("cpu"), rows=2)
    a, b = Sequence("a", [1] * 5, SamplingParams()), Sequence("b", [2] * 2, SamplingParams())
    a.block_table, b.block_table = [3, 9], [4]
    out = torch.full((3, 4), 77, dtype=torch.int32)
    tables.gather(tables.rows([b, a]), 4, out=out[:2])
    assert out.tolist() == [[4, -1, -1, -1], [3, 9, -1, -1], [77] * 4]
    a.block_table = [0] * 5
    with pytest.raises(ValueError, match="5 blocks, more than the 4"):
        tables.rows([a])
