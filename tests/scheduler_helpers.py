"""The scheduler tests' fakes: a scheduler over a small block pool, sequences of plain token ids, and one engine
step with a runner that samples a fresh token wherever one is due."""
from bunny_backend.config import EngineConfig
from bunny_backend.engine.core.block_manager import BlockManager
from bunny_backend.engine.core.scheduler import Scheduler
from bunny_backend.engine.core.sequence import Sequence
from bunny_backend.engine.sampling_params import SamplingParams

BS = 4


def make_sched(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024,
               max_prefill_tokens_while_decoding=0, max_images_per_encoder_batch=4, encoder_cache=(),
               prefill_chunks_while_decoding=1):
    cfg = EngineConfig(max_num_seqs=min(max_num_seqs, max_num_batched_tokens),
                       max_num_batched_tokens=max_num_batched_tokens,
                       max_images_per_encoder_batch=max_images_per_encoder_batch)
    return Scheduler(cfg, BlockManager(num_blocks, BS), max_model_len, encoder_cache,
                     max_prefill_tokens_while_decoding, prefill_chunks_while_decoding)


_next_token = iter(range(1000, 10**9))


def make_seq(request_id, n, first=0):
    return Sequence(request_id, list(range(first, first + n)), SamplingParams())


def step(sched):
    """One engine step with a fake runner that samples a fresh token wherever one is due."""
    out = sched.schedule()
    sched.postprocess(out, [next(_next_token) if want else None for want in out.needs_sample])
    return out


def assert_all_free(sched):
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
