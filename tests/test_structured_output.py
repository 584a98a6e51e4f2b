"""Structured output at the engine level: response_format's grammars hold for every sample, the rows without one are
untouched, bad formats are refused by name, and preemption and cancellation leave nothing behind."""
import json
import re
import shutil

import jsonschema
import pytest
import torch

from bunny_backend.engine.outputs import BadRequestError
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.structured_output import TokenMask
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.tools.reference import ReferenceBunny
from engine_helpers import make_engine, run_all
from model_helpers import prompt_ids

VOCAB = 1600   # the LM head has rows past the demo tokenizer's 1536 tokens, as Qwen's does: never allowed
# Bounded so that random weights end it: short strings, few items, small integers, an enum.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "scores": {"type": "array", "minItems": 1, "maxItems": 3,
                   "items": {"type": "array", "minItems": 1, "maxItems": 3,
                             "items": {"type": "integer", "minimum": 0, "maximum": 99}}},
        "kind": {"enum": ["cat", "dog", 7]},
    },
    "required": ["name", "scores", "kind"],
    "additionalProperties": False,
}
JSON_SCHEMA = json.dumps({"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}})
REGEX = "[a-z]{3}-[0-9]{2,4}"
CHOICES = ["yes", "no", "nope", 'say "hi"\n']


def fmt(**spec) -> str:
    return json.dumps(spec)


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engine(model_path):
    return make_engine(model_path, max_num_seqs=64, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


def sampled(n, text="Describe a pet.", images=(), response_format=JSON_SCHEMA, **kw):
    kw.setdefault("max_tokens", 120)
    return [(0, f"s{i}", text, list(images), SamplingParams(temperature=1.0, seed=1000 + i,
                                                            response_format=response_format, **kw))
            for i in range(n)]


def assert_idle(engine):
    assert not engine.has_unfinished() and engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("with_image", [False, True])
def test_json_schema_samples_validate(engine, tokenizer, test_images, with_image):
    """50 samples at temperature 1, batched, each its own seed: all end at the grammar's end and validate."""
    images = [test_images[1]] if with_image else []
    results = run_all(engine, sampled(50, "Describe the image." if with_image else "Describe a pet.", images))
    for rid, (ids, text, reason) in results.items():
        assert reason == "stop", (rid, text)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert max(ids) < len(tokenizer), rid   # the padded rows of the LM head never come out
    assert len({text for _, text, _ in results.values()}) > 10   # the seeds made different samples
    assert_idle(engine)


def test_json_object_parses(checkpoint_factory):
    """Free JSON objects: a near-uniform model whose quote token is favoured, so strings end within max_tokens."""
    path = checkpoint_factory(seed=5, num_kv_heads=2, vocab_size=VOCAB, std=0.001)
    engine = make_engine(path, max_num_seqs=64, max_num_batched_tokens=512)
    quote = load_tokenizer(path).convert_tokens_to_ids('"')
    compute_logits = engine.model.compute_logits

    def favour_quotes(hidden):
        logits = compute_logits(hidden)
        logits[..., quote] += 8.0
        return logits

    engine.model.compute_logits = favour_quotes
    results = run_all(engine, sampled(24, response_format=fmt(type="json_object"), max_tokens=100))
    objects = []
    for rid, (_, text, reason) in results.items():
        assert reason == "stop", (rid, text)
        objects.append(json.loads(text))
        assert isinstance(objects[-1], dict), (rid, text)
    assert sum(bool(o) for o in objects) > 10   # not only {}


def test_regex_and_choice_hold(engine):
    reqs = sampled(8, response_format=fmt(type="regex", regex=REGEX), max_tokens=20)
    reqs += [(0, f"c{i}", "Yes or no?", [], SamplingParams(temperature=1.0, seed=i, max_tokens=20,
                                                          response_format=fmt(type="choice", choices=CHOICES)))
             for i in range(8)]
    results = run_all(engine, reqs)
    for rid, (_, text, reason) in results.items():
        assert reason == "stop", (rid, text)
        assert re.fullmatch(REGEX, text) if rid.startswith("s") else text in CHOICES, (rid, text)
    assert len({text for rid, (_, text, _) in results.items() if rid.startswith("c")}) > 1
    assert_idle(engine)


def choice_greedy_reference(model_path, tokenizer, text, choices, eos_ids, max_tokens=20):
    """Greedy decoding restricted to `choices`, by the transformers reference: at each step the most likely token
    whose text keeps the answer a prefix of a choice, or an EOS once it is one."""
    ref = ReferenceBunny.from_pretrained(model_path)
    pieces = {t: tokenizer.decode([t]) for t in range(len(tokenizer))}
    ids, answer, out = prompt_ids(tokenizer, text, False), "", []
    for _ in range(max_tokens):
        logits = ref.logits(ids)[-1]
        allowed = [t for t, p in pieces.items() if p and any(c.startswith(answer + p) for c in choices)]
        allowed += list(eos_ids) if answer in choices else []
        token = max(allowed, key=lambda t: logits[t].item())
        out.append(token)
        if token in eos_ids:
            break
        ids, answer = ids + [token], answer + pieces[token]
    return out


def test_rows_without_a_grammar_are_untouched_and_greedy_rows_take_the_masked_argmax(engine, model_path,
                                                                                     tokenizer, test_images):
    free = [(0, "f0", "What is a rabbit?", [], SamplingParams(max_tokens=24)),
            (0, "f1", "Describe the image.", [test_images[0]], SamplingParams(max_tokens=24)),
            (0, "f2", "Tell me a story about the sea.", [], SamplingParams(max_tokens=24, ignore_eos=True))]
    choice = fmt(type="choice", choices=CHOICES)
    grammar = [(0, "g0", "Yes or no?", [], SamplingParams(max_tokens=20, response_format=choice)),
               (0, "g1", "What is a rabbit?", [], SamplingParams(max_tokens=20, response_format=JSON_SCHEMA)),
               *sampled(4)]
    alone = run_all(engine, free)
    together = run_all(engine, free + grammar)
    assert {rid: together[rid] for rid in alone} == alone
    want = choice_greedy_reference(model_path, tokenizer, "Yes or no?", CHOICES, engine.eos_token_ids)
    assert together["g0"][0] == want and together["g0"][2] == "stop"
    assert_idle(engine)


BAD_FORMATS = [
    ("not json", "response_format is not valid JSON"),
    (fmt(kind="json_object"), 'response_format must be a JSON object with a string "type"'),
    (fmt(type="xml"), "response_format type 'xml' is not one of text, json_object, json_schema, regex, choice"),
    (fmt(type="json_schema"), 'needs a "json_schema" object'),
    (fmt(type="json_schema", json_schema={"name": "x"}), 'needs a "schema" object'),
    (fmt(type="json_schema", json_schema={"schema": {"type": "foo"}}),
     'the JSON schema cannot be compiled: Unsupported type "foo"'),
    (fmt(type="json_schema", json_schema={"schema": {"$ref": "#/nowhere"}}), "the JSON schema cannot be compiled"),
    (fmt(type="regex", regex="(ab"),
     "the regex cannot be compiled: Regex parsing error at position 4: The parenthesis is not closed"),
    (fmt(type="choice", choices=[]), '"choices": a non-empty list of non-empty strings'),
    (fmt(type="choice", choices=["a", 1]), '"choices": a non-empty list of non-empty strings'),
]


def test_bad_formats_are_refused_by_name_and_the_engine_serves_on(engine):
    engine.add_request("busy", "Describe a pet.", [], SamplingParams(max_tokens=8, response_format=JSON_SCHEMA))
    engine.step()
    for response_format, needle in BAD_FORMATS:
        with pytest.raises(BadRequestError) as caught:
            engine.add_request("bad", "Describe a pet.", [], SamplingParams(response_format=response_format))
        assert needle in str(caught.value), response_format
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[-1].request_id == "busy" and outputs[-1].finish_reason in ("stop", "length")
    results = run_all(engine, sampled(3))
    assert all(reason == "stop" for _, _, reason in results.values())
    assert_idle(engine)


def test_text_format_is_free_text(engine):
    free = [(0, "t", "What is a rabbit?", [], SamplingParams(max_tokens=12))]
    text = [(0, "t", "What is a rabbit?", [], SamplingParams(max_tokens=12, response_format=fmt(type="text")))]
    assert run_all(engine, text) == run_all(engine, free)


def test_cancelled_mid_way_leaves_nothing_behind(engine):
    engine.add_request("c", "Describe a pet.", [], SamplingParams(temperature=1.0, seed=3, max_tokens=120,
                                                                  response_format=JSON_SCHEMA))
    outputs = []
    for _ in range(5):   # a token each (its prompt is prefilled in one step)
        outputs += engine.step()
    assert [o.finish_reason for o in outputs] == [None] * 5
    engine.abort("c")
    outputs += engine.step()
    assert outputs[-1].finish_reason == "cancelled"
    assert_idle(engine)
    # the same format and seed again, from scratch: it is not stuck at the cancelled one's place in the grammar
    again = run_all(engine, [(0, "c", "Describe a pet.", [], SamplingParams(temperature=1.0, seed=3, max_tokens=120,
                                                                            response_format=JSON_SCHEMA))])
    ids, text, reason = again["c"]
    assert reason == "stop" and ids[:5] == [t for o in outputs for t in o.delta_token_ids][:5]
    jsonschema.validate(json.loads(text), SCHEMA)


def test_preemption_keeps_the_grammar_in_step(model_path):
    """Recomputed sequences keep their tokens and their matchers: seeded samples equal those of a roomy cache."""
    from bunny_backend.engine.worker.kv_cache import bytes_per_block
    from bunny_backend.model.config import BunnyConfig
    cfg = BunnyConfig.from_pretrained(model_path)
    reqs = sampled(12)
    roomy = run_all(make_engine(model_path, max_num_seqs=64, block_size=4), reqs)
    tight = make_engine(model_path, max_num_seqs=64, block_size=4,
                        kv_cache_memory_bytes=80 * bytes_per_block(cfg.text, 4, torch.float32))
    assert run_all(tight, reqs) == roomy
    assert tight.stats().num_preemptions > 0
    assert all(reason == "stop" for _, _, reason in roomy.values())


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_the_grammar_ends_at_the_checkpoints_eos_ids(model_path, tmp_path, tokenizer, ignore_eos):
    """generation_config's EOS ids (here two, neither the tokenizer's eos_token) are what an ended grammar allows,
    and its end ends the sequence even under ignore_eos."""
    path = tmp_path / "ckpt"
    shutil.copytree(model_path, path)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert tokenizer.eos_token_id not in eos
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    engine = make_engine(path, max_num_seqs=64, max_num_batched_tokens=512)
    results = run_all(engine, sampled(8, ignore_eos=ignore_eos, response_format=fmt(type="regex", regex=REGEX)))
    for rid, (ids, text, reason) in results.items():
        assert reason == "stop" and ids[-1] in eos and re.fullmatch(REGEX, text), (rid, ids, text)


def test_token_mask_matches_the_bits_on_its_rows_only():
    """TokenMask.apply against a bit-by-bit reading of xgrammar's layout (bit j of word w: token 32 w + j)."""
    gen = torch.Generator().manual_seed(0)
    vocab, batch, rows = 75, 4, [1, 3]
    mask = TokenMask(rows, torch.randint(-2**31, 2**31 - 1, (len(rows), 3), generator=gen, dtype=torch.int32))
    logits = torch.randn(batch, vocab, generator=gen)
    before = logits.clone()
    out = mask.apply(logits)
    assert torch.equal(logits, before)   # a copy: the raw logits stay for logprobs
    want = before.clone()
    for k, row in enumerate(rows):
        for token in range(vocab):
            word = int(mask.bitmask[k, token // 32]) & 0xFFFFFFFF
            if not (word >> (token % 32)) & 1:
                want[row, token] = float("-inf")
    assert torch.equal(out, want)


def test_length_bounded_strings_hold_no_raw_control_characters(engine, tokenizer):
    """JSON forbids raw U+0000-U+001F in strings (json.loads says so); xgrammar 0.2.9's maxLength alone allows them."""
    schema = {"type": "object", "properties": {"n": {"type": "string", "maxLength": 4}}, "required": ["n"]}
    with pytest.raises(json.JSONDecodeError, match="Invalid control character"):
        json.loads('{"n": "a\x0e"}')
    grammar = engine.grammars.matcher(fmt(type="json_schema", json_schema={"schema": schema}))
    assert all(grammar.accept(t) for t in tokenizer.encode('{"n": "a'))
    assert not grammar.accept(tokenizer.encode("\x0e")[0])
    assert all(grammar.accept(t) for t in tokenizer.encode('b"}'))
