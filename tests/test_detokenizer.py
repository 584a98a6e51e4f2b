import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bunny_backend.io.detokenizer import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A rabbit sits in the garden and eats a carrot.",
    "Stop here, then go on with the story of the bunny.",
    "你好，世界。这是一只兔子，它在花园里吃胡萝卜。",
    "今天天气很好，我们去公园散步吧。",
]


@pytest.fixture(scope="module")
def tokenizer():
    # Byte-level BPE like Qwen2's; a small vocabulary leaves most Chinese characters split over several tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def stream(detok, ids):
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.finish()


def test_multibyte_characters_are_never_split(tokenizer):
    text = "Hello 你好，兔子🐰 eats 胡萝卜🥕!"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "test needs characters split over tokens"
    detok = IncrementalDetokenizer(tokenizer)
    deltas, tail = stream(detok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + tail == tokenizer.decode(ids) == text == detok.text
    assert tail == ""
    assert sum(1 for d in deltas if d) > 5  # it does stream


def test_incomplete_tail_is_flushed_by_finish(tokenizer):
    ids = tokenizer.encode("ok 兔")
    detok = IncrementalDetokenizer(tokenizer)
    deltas, _ = stream(detok, ids[:-1])  # the last character is cut
    assert "".join(deltas) == "ok "
    assert detok.text == tokenizer.decode(ids[:-1]) == "ok \ufffd"


def test_stop_string_spanning_tokens(tokenizer):
    ids = tokenizer.encode("The rabbit sits in the garden and eats a carrot.")
    stop = "in the gar"
    pieces = [tokenizer.decode([i]) for i in ids]
    assert stop not in pieces
    detok = IncrementalDetokenizer(tokenizer, stop=["zebra", stop])
    emitted = ""
    for i in ids:
        emitted += detok.add(i)
        if detok.stopped:
            break
    emitted += detok.finish()
    assert detok.stopped and detok.stop_string == stop
    assert emitted == detok.text == "The rabbit sits "
    assert detok.add(ids[0]) == "" and detok.finish() == ""


def test_stop_string_in_chinese(tokenizer):
    ids = tokenizer.encode("你好，世界。这是一只兔子")
    detok = IncrementalDetokenizer(tokenizer, stop=["。"])
    deltas, tail = stream(detok, ids)
    assert "".join(deltas) + tail == detok.text == "你好，世界"
    assert detok.stop_string == "。"


def test_partial_stop_prefix_is_held_then_released(tokenizer):
    text = "the lazy dog"
    stop = "lazy cat"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, stop=[stop])
    emitted, held_back = "", False
    for n, i in enumerate(ids, 1):
        emitted += detok.add(i)
        full = tokenizer.decode(ids[:n])
        held = max((k for k in range(len(full) + 1) if stop.startswith(full[len(full) - k:])), default=0)
        assert emitted == full[:len(full) - held]
        held_back |= held > 0
    assert held_back and emitted == text  # " d" ruled the stop string out: the held "lazy" was released
    assert not detok.stopped and detok.finish() == ""


def test_held_prefix_is_flushed_at_finish(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["the end"])
    deltas, tail = stream(detok, tokenizer.encode("go to the"))
    assert "".join(deltas) == "go to " and tail == "the"
    assert not detok.stopped and detok.text == "go to the"


def test_special_tokens(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("a rabbit") + [eos] + tokenizer.encode(" and a fox") + [eos]
    skipped = IncrementalDetokenizer(tokenizer)
    assert "".join(stream(skipped, ids)[0]) == "a rabbit and a fox"
    kept = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    deltas, tail = stream(kept, ids)
    assert "".join(deltas) + tail == "a rabbit<|endoftext|> and a fox<|endoftext|>"


def test_window_stays_small(tokenizer):
    ids = tokenizer.encode(" ".join(CORPUS) * 20)
    detok = IncrementalDetokenizer(tokenizer)
    widest = 0
    for i in ids:
        detok.add(i)
        widest = max(widest, len(detok._ids) - detok._prefix_offset)
    assert widest <= 8
    assert detok.text + detok.finish() == tokenizer.decode(ids)


def test_invalid_utf8_does_not_grow_the_window(tokenizer):
    lead_byte = tokenizer.convert_tokens_to_ids("\u00e4")  # byte 0xE4 alone: a 3-byte character that never completes
    detok = IncrementalDetokenizer(tokenizer)
    for _ in range(100):
        detok.add(lead_byte)
        assert len(detok._ids) - detok._prefix_offset <= 32  # last emitted chunk + pending tokens
    assert detok.text + detok.finish() == tokenizer.decode([lead_byte] * 100)
