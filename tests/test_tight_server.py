"""A server with a tiny KV cache and tight limits (config.pbtxt parameters through bunny-serve --param)."""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bunny_backend.config import EngineConfig
import fault_injection
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.sampling_params import SamplingParams
from grpc_helpers import TEXTS, error_kind, inputs_of, joined, send_raw
from reliability_report import record
from server_fixture import alive, start_server, stop_process, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]
BLOCK_BYTES = 2 * 2 * 2 * 16 * 16 * 4   # K and V, 2 layers, 2 KV heads, head_dim 16, 16 tokens, fp32
TIGHT = {"kv_cache_memory_bytes": str(48 * BLOCK_BYTES), "max_num_seqs": "16", "max_queued_requests": "16",
         "num_threads": "2", "max_output_tokens": "160", "max_image_bytes": "200000", "max_prompt_tokens": "300",
         "max_text_bytes": "4096", "encoder_cache_bytes": "0"}   # the prefix cache alone keeps image rows


@pytest.fixture(scope="module")
def tight_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("tight") / "server.log", params=TIGHT)
    yield server
    assert stop_process(server.proc) == 0, server.log_text()[-3000:]


def one_by_one(model_path, requests) -> list[list[int]]:
    """Each request alone: added to an engine only once the one before it finished, so that every step holds one
    sequence (asserted); no prefix cache, so nothing of one request's run reaches the next."""
    engine = LLMEngine(EngineConfig(model_path=str(model_path), device="cpu", dtype="float32",
                                    kv_cache_memory_bytes=8 << 20, enable_prefix_caching=False))
    schedule = engine.scheduler.schedule
    widest = []

    def recording():
        step = schedule()
        widest.append(len(step.seqs))
        return step

    engine.scheduler.schedule = recording
    got = []
    for i, (text, max_tokens) in enumerate(requests):
        engine.add_request(str(i), text, [], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        ids = []
        while engine.has_unfinished():
            for out in engine.step():
                assert out.request_id == str(i)
                ids += out.delta_token_ids
        got.append(ids)
    assert max(widest) == 1, "the reference ran more than one sequence in a step"
    return got


def in_flight(server) -> float:
    return server.metric("bunny_num_requests_running") + server.metric("bunny_num_requests_waiting")


def test_kv_exhaustion_32_long_requests_all_complete(tight_server, tiny_checkpoint):
    assert tight_server.metric("bunny_kv_blocks_total") == 48
    requests = [(f"{TEXTS[i % len(TEXTS)]} ({i})", 100 + i) for i in range(32)]
    preempted_before = tight_server.metric("bunny_preemptions_total")
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda r: send_raw(tight_server.url, inputs_of(r[0], stream=True, max_tokens=r[1],
                                                                                ignore_eos=True)), requests))
    assert [error for _, error in results] == [None] * 32
    got = [joined(responses)[1] for responses, _ in results]
    assert got == one_by_one(tiny_checkpoint, requests)
    preemptions = tight_server.metric("bunny_preemptions_total") - preempted_before
    idle = tight_server.wait_until_idle()
    record("KV exhaustion", requests=32, kv_blocks=48, completed=sum(r[-1]["reason"] == "length" for r, _ in results),
           preemptions=int(preemptions), after=idle)
    assert preemptions > 0 and not any(idle.values())


def test_beyond_the_queue_limit_the_next_request_is_told_busy(tight_server):
    """32 slow requests (test hook: every step with one of them takes 0.1 s longer) stay in flight.

    All of them are slow, not just one: with 48 KV blocks, preemption can take any request out of the batch,
    and the batch must not then run fast enough for the others to finish before the test cancels them."""
    hold = dict(stream=True, max_tokens=150, ignore_eos=True)
    with ThreadPoolExecutor(32) as pool:
        held = [pool.submit(send_raw, tight_server.url, inputs_of(f"Question {i} " + fault_injection.SLOW_MARKER,
                                                                   **hold), cancel_after_s=10) for i in range(32)]
        wait_for(lambda: in_flight(tight_server) >= 32, 30, "32 requests not in flight", poll_s=0.02)
        t0 = time.monotonic()
        busy = send_raw(tight_server.url, inputs_of("One more?", max_tokens=4))
        refused_in = time.monotonic() - t0
        results = [f.result() for f in held]
    assert error_kind(busy[1]) == "busy" and "max_queued_requests" in str(busy[1]), busy
    assert all(error == "cancelled by the test" for _, error in results)   # none had finished: all were held
    idle = tight_server.wait_until_idle()
    record("queue limit", in_flight=32, refused_with="server busy", refused_in_s=round(refused_in, 3), after=idle)
    assert not any(idle.values())


@pytest.mark.parametrize("kw, needle", [
    (dict(text="hi", max_tokens=161), "max_output_tokens"),
    (dict(text="word " * 400, max_tokens=4), "max_prompt_tokens"),
    (dict(text="x" * 5000, max_tokens=4), "max_text_bytes"),
    (dict(text="hi", images=[b"\x89PNG" + bytes(300_000)], max_tokens=4), "max_image_bytes"),
])
def test_configured_limits_reach_the_client(tight_server, kw, needle):
    responses, error = send_raw(tight_server.url, inputs_of(**kw))
    assert responses == [] and needle in str(error), str(error)


def small_jpeg(image: bytes) -> bytes:
    """An image under the tight server's max_image_bytes."""
    import io

    from PIL import Image
    out = io.BytesIO()
    with Image.open(io.BytesIO(image)) as im:
        im.convert("RGB").resize((256, 192)).save(out, "JPEG", quality=80)
    return out.getvalue()


def prompt_rows(tokenizer, rows_per_image: int, question: str, image_key: str) -> list:
    """The prompt as the cache sees it, derived here: the conv_bunny text around one image (tokenized on either side
    of it), the image's rows as (image, row) pairs."""
    from model_helpers import BUNNY_SYSTEM
    before = tokenizer.encode(f"{BUNNY_SYSTEM} USER: ", add_special_tokens=False)
    after = tokenizer.encode(f"\n{question} ASSISTANT:", add_special_tokens=False)
    return before + [(image_key, r) for r in range(rows_per_image)] + after, len(before)


def test_prefix_cache_with_images_matches_the_reference(tight_server, tiny_checkpoint, test_images):
    """Image requests through the prefix cache, with the encoder cache off: another image after the same text, the
    same image with another question (a hit that ends inside the image's last block), and the same request again
    after an eviction. Each answer equals the transformers reference; each hit count on /metrics equals the full
    16-token blocks the request shares with what is still cached, and the tower runs exactly when some image row
    is not cached."""
    from transformers import AutoTokenizer

    from bunny_backend.io.tokenizer import load_tokenizer
    from bunny_backend.tools.reference import ReferenceBunny
    from model_helpers import image_feature_rows

    ref, tok = ReferenceBunny.from_pretrained(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    hf_tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    rows = image_feature_rows(tiny_checkpoint)
    images = {"rocket": test_images[3], "chelsea": small_jpeg(test_images[2])}
    assert all(len(b) <= 200000 for b in images.values())
    block = 16
    cached: list[list] = []   # prompts whose blocks are still in the cache (the test evicts them all below)

    def expected_hit(prompt) -> int:
        best = 0
        for other in cached:
            n = 0
            while n < min(len(prompt), len(other)) and prompt[n] == other[n]:
                n += 1
            best = max(best, n)
        return min(best, len(prompt) - 1) // block * block   # full blocks only; the last token is always computed

    def ask(question, image_key):
        server = tight_server
        before = {n: server.metric(n) for n in ("bunny_prefix_cache_hit_tokens_total", "bunny_encoder_images_total")}
        responses, err = send_raw(server.url, inputs_of(question, images=[images[image_key]], max_tokens=12))
        assert err is None, err
        prompt, n_before = prompt_rows(hf_tok, rows, question, image_key)
        hit = expected_hit(prompt)
        got = {n: server.metric(n) - v for n, v in before.items()}
        assert responses[-1]["prompt"] == len(prompt)
        assert got["bunny_prefix_cache_hit_tokens_total"] == hit, (question, image_key, got, hit)
        assert got["bunny_encoder_images_total"] == (1 if hit < n_before + rows else 0), (question, image_key, got)
        assert responses[-1]["ids"] == ref.chat(tok, question, images[image_key], max_new_tokens=12)[0]
        cached.append(prompt)
        return hit, n_before

    def evict():
        """Distinct prompts without the template, more blocks than the cache holds (48), one after another: every
        block cached before them is reused by them."""
        used = 0
        for i in range(4):
            words = []
            while len(hf_tok.encode(" ".join(words + [f"w{i}x{len(words)}"]), add_special_tokens=False)) <= 250:
                words.append(f"w{i}x{len(words)}")
            responses, err = send_raw(tight_server.url, inputs_of(" ".join(words), max_tokens=4,
                                                                   apply_chat_template=False))
            assert err is None, str(err)
            used += -(-(responses[-1]["prompt"] + 4) // block)
        assert used > 48
        cached.clear()

    q1, q2 = "What is in the picture?", "What colour is it?"
    evict()                                        # whatever the module's other tests left cached
    assert ask(q1, "rocket")[0] == 0
    hit, n_before = ask(q1, "chelsea")             # same text, another image: only the blocks before the image
    assert 0 < hit <= n_before
    hit, n_before = ask(q2, "chelsea")             # same image, another question: the hit reaches into the image
    assert hit >= n_before + rows - block + 1 and hit > n_before
    evict()
    assert ask(q1, "chelsea")[0] == 0              # evicted: recomputed, the tower runs again


def test_zz_sigterm_with_queued_and_streaming_requests_ends_each_once(tight_server):
    """The module's last test (it stops the module's server): SIGTERM to bunny-serve while 16 streams run and 4
    requests wait. Each request ends exactly once, none hangs: a whole answer if it finished within tritonserver's
    exit timeout, else UNAVAILABLE as the server closes; bunny-serve exits 0 and leaves no process behind."""
    from test_scale_out_server import descendants

    slow = dict(max_tokens=150, ignore_eos=True)
    first_tokens = threading.Semaphore(0)
    with ThreadPoolExecutor(20) as pool:
        streams = [pool.submit(send_raw, tight_server.url, inputs_of(f"Stream {i} {fault_injection.SLOW_MARKER}",
                                                                     stream=True, **slow),
                               timeout=60, on_response=lambda r: first_tokens.release()) for i in range(16)]
        wait_for(lambda: tight_server.metric("bunny_num_requests_running") == 16, 30, "16 streams not running",
                 poll_s=0.05)
        queued = [pool.submit(send_raw, tight_server.url, inputs_of(f"Queued {i}", stream=i % 2 == 0, **slow),
                              timeout=60) for i in range(4)]
        wait_for(lambda: tight_server.metric("bunny_num_requests_waiting") == 4, 30, "4 requests not queued",
                 poll_s=0.05)
        assert first_tokens.acquire(timeout=30)   # at least one stream is mid-stream
        processes = descendants(tight_server.proc.pid)
        assert processes
        rc = stop_process(tight_server.proc)
        results = [f.result() for f in streams + queued]   # queue.Empty (a hang) fails the test
    ends = []
    for responses, error in results:
        finals = [r for r in responses if r["final"]]
        assert len(finals) + (error is not None) == 1, (responses[-2:], error)
        assert all(not r["final"] for r in responses[:-1])
        if finals:   # finished within tritonserver's exit timeout: the whole answer
            assert finals[0]["reason"] == "length" and finals[0]["completion"] == 150 == len(joined(responses)[1])
        else:        # still running when the server closed: its stream ends with UNAVAILABLE
            assert "UNAVAILABLE" in str(error), str(error)
        ends.append(finals[0]["reason"] if finals else "UNAVAILABLE")
    record("SIGTERM under load", streams=16, queued=4, ends=dict(collections.Counter(ends)), exit_code=rc,
           errors=sorted({str(e)[:120] for _, e in results if e is not None}))
    assert rc == 0, tight_server.log_text()[-3000:]
    wait_for(lambda: not [p for p in processes if alive(p)], 15, f"processes left after SIGTERM: {processes}")
