"""The scheduler around image rows: a prompt ending in an image never decodes its last image row, and the encoder's
budget of images per step stops a chunk before an image it cannot encode."""
import hashlib

from bunny_backend.engine.core.sequence import ImageSpan, Sequence
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX
from scheduler_helpers import make_sched, step


def test_prompt_ending_in_an_image_row_never_decodes_it():
    sched = make_sched(max_num_batched_tokens=5)
    img = ImageSpan(2, 4, hashlib.sha256(b"x").digest(), pixel_values=None)
    seq = Sequence("img", [1, 2] + [IMAGE_TOKEN_INDEX] * 4, SamplingParams(), images=[img])
    sched.add(seq)
    out = step(sched)
    assert out.num_new_tokens == [5] and seq.num_cached_tokens == seq.num_tokens - 1
    assert not seq.is_prefill_done
    out = step(sched)
    assert out.num_decodes == 0 and out.num_new_tokens == [1] and out.needs_sample == [True]
    assert seq.is_prefill_done


def image_seq(request_id, content, offset=2, length=4, tail=2):
    img = ImageSpan(offset, length, hashlib.sha256(content).digest(), pixel_values=None)
    ids = list(range(1, offset + 1)) + [IMAGE_TOKEN_INDEX] * length + list(range(50, 50 + tail))
    return Sequence(request_id, ids, SamplingParams(), images=[img])


def test_encoder_budget_stops_a_chunk_before_an_image_it_cannot_encode():
    cached = hashlib.sha256(b"cached").digest()
    sched = make_sched(max_images_per_encoder_batch=1, encoder_cache={cached})
    x1, y, c = image_seq("x1", b"x"), image_seq("y", b"y"), image_seq("c", b"cached")
    x2 = image_seq("x2", b"x", offset=3)   # x's image after another text: no block in common with x1
    for s in (x1, y, x2, c):
        sched.add(s)
    out = sched.schedule()
    # x1 takes the one image of the budget; y stops before its image; x2 shares x1's; c's is in the cache
    assert out.seqs == [x1, y, x2, c] and out.num_new_tokens == [8, 2, 9, 8]
    assert out.images == [x1.images[0], x2.images[0], c.images[0]]
    sched.postprocess(out, [1, None, 2, 3])
    out = sched.schedule()            # the runner filled nothing (no encoder here): y's image is encoded now
    assert y in out.seqs and y.images[0] in out.images and out.num_new_tokens[out.seqs.index(y)] == 6


def test_an_admitted_sequence_may_wait_for_the_encoder_budget():
    sched = make_sched(max_images_per_encoder_batch=1)
    a, b = image_seq("a", b"a"), image_seq("b", b"b", offset=0)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.seqs == [a] and sched.num_running == 2    # b is admitted, its chunk would start with its image
    sched.postprocess(out, [1])
    a.images[0].embeds = object()     # as the encoder phase would have filled it
    out = sched.schedule()
    assert out.seqs == [a, b] and out.num_decodes == 1 and out.images == [b.images[0]]
