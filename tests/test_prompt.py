"""Chat template, chunked tokenization around <image>, and tokenizer loading."""
import json
import shutil

import pytest

from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX, SYSTEM_PROMPT, build_prompt, tokenize_prompt
from bunny_backend.io.tokenizer import eos_token_ids, load_tokenizer, tokenizer_eos_id

HEAD = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def test_template_text_exact():
    assert SYSTEM_PROMPT == HEAD
    assert build_prompt("What is this?", True) == f"{HEAD} USER: <image>\nWhat is this? ASSISTANT:"
    assert build_prompt("Hi", False) == f"{HEAD} USER: Hi ASSISTANT:"
    assert build_prompt("raw text", False, apply_chat_template=False) == "raw text"
    assert build_prompt("raw text", True, apply_chat_template=False) == "<image>\nraw text"
    assert build_prompt("see <image> here", True, apply_chat_template=False) == "see <image> here"


def test_image_placeholder_position(tok):
    enc = lambda s: tok.encode(s, add_special_tokens=False)    # noqa: E731
    assert tokenize_prompt(tok, "a cat<image>on a table") == enc("a cat") + [IMAGE_TOKEN_INDEX] + enc("on a table")
    prompt = build_prompt("Describe it.", True)
    ids = tokenize_prompt(tok, prompt, num_images=1)
    before, after = prompt.split("<image>")
    assert ids == enc(before) + [IMAGE_TOKEN_INDEX] + enc(after)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tokenize_prompt(tok, "<image>") == [IMAGE_TOKEN_INDEX]
    assert tokenize_prompt(tok, "<image><image>x") == [IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX] + enc("x")
    assert tokenize_prompt(tok, "") == []


@pytest.mark.parametrize("prompt, n", [("<image> one", 0), ("no tag", 1), ("<image><image>", 1)])
def test_tag_count_mismatch(tok, prompt, n):
    with pytest.raises(ValueError, match="placeholder"):
        tokenize_prompt(tok, prompt, num_images=n)


def test_chinese_round_trip(tok):
    text = "这张图片里有什么？请详细描述一下。A cat 在沙发上 sleeps, 2024年。"
    ids = tokenize_prompt(tok, build_prompt(text, False))
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == build_prompt(text, False)


def test_eos_and_special_tokens(tok, tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    eos = tokenizer_eos_id(tok)
    assert tok.convert_ids_to_tokens(eos) == "<|endoftext|>" == tok.eos_token
    assert eos == config["eos_token_id"] and len(tok) == config["vocab_size"]
    assert tok.decode([eos, *tok.encode("hi", add_special_tokens=False)], skip_special_tokens=True) == "hi"
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)   # no BOS


@pytest.mark.parametrize("generation, config, want", [
    ({"eos_token_id": 7}, {"eos_token_id": 5}, (7,)),
    ({"eos_token_id": [9, 7, 9]}, {"eos_token_id": 5}, (9, 7)),
    ({"bos_token_id": 1}, {"eos_token_id": 5}, (5,)),
    (None, {"eos_token_id": [5, 6]}, (5, 6)),
    (None, {"eos_token_id": None}, "tokenizer"),
    ({"eos_token_id": []}, {}, "tokenizer"),
])
def test_eos_ids_come_from_the_checkpoint(tok, tmp_path, generation, config, want):
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert eos_token_ids(tmp_path, tok) == ((tokenizer_eos_id(tok),) if want == "tokenizer" else want)


def test_a_bad_eos_id_is_named(tok, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
        eos_token_ids(tmp_path, tok)


def test_vocab_merges_only_matches_tokenizer_json(tok, tiny_checkpoint, tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    slow = load_tokenizer(tmp_path)
    text = build_prompt("Two  spaces,\n\nnew lines; 数字 12345 and <|im_start|>tags<|im_end|>", True)
    assert tokenize_prompt(slow, text) == tokenize_prompt(tok, text)
    assert tokenizer_eos_id(slow) == tokenizer_eos_id(tok)


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
