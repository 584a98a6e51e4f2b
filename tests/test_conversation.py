"""Bunny's conversation template (io/conversation.py) against conv_bunny's rules, and multi-turn, multi-image
requests through the engine against the transformers-composed reference."""
from __future__ import annotations

import pytest

from bunny_backend.engine.outputs import BadRequestError
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io.conversation import ConversationError, Message, build_prompt
from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX, tokenize_prompt
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.tools.reference import ReferenceBunny
from engine_helpers import make_engine

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def conv_bunny_prompt(turns: list[str], system: str = SYSTEM) -> str:
    """Bunny's Conversation.get_prompt (sep_style TWO, sep " ", sep2 "<|endoftext|>") as written in its repo:
    the turns alternate USER/ASSISTANT and a last None asks for the answer."""
    seps = [" ", "<|endoftext|>"]
    ret = system + seps[0]
    for i, message in enumerate(turns + [None]):
        role = ("USER", "ASSISTANT")[i % 2]
        ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return ret


def bunny_tokens(tokenizer, prompt: str) -> list[int]:
    """Bunny's tokenizer_image_token: each chunk around <image> tokenized on its own, -200 between."""
    chunks = [tokenizer(chunk, add_special_tokens=False).input_ids for chunk in prompt.split("<image>")]
    out = chunks[0]
    for chunk in chunks[1:]:
        out = out + [IMAGE_TOKEN_INDEX] + chunk
    return out


def conversation(*texts: str, system: str | None = None) -> list[Message]:
    msgs = [Message("system", system)] if system is not None else []
    return msgs + [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]


def test_one_user_message_is_the_single_turn_template():
    assert build_prompt("Hi", 0) == f"{SYSTEM} USER: Hi ASSISTANT:" == conv_bunny_prompt(["Hi"])
    assert build_prompt("What is this?", 1) == conv_bunny_prompt(["<image>\nWhat is this?"])
    assert build_prompt(conversation("Hi"), 0) == build_prompt("Hi", 0)


def test_multi_turn_follows_conv_bunny():
    turns = ["<image>\nWhat is it?", "A rabbit.", "What colour?", "White.", "Where is it?"]
    assert build_prompt(conversation(*turns), 1) == conv_bunny_prompt(turns)
    assert build_prompt(conversation(*turns), 1).endswith("White.<|endoftext|>USER: Where is it? ASSISTANT:")
    assert build_prompt(conversation("Hi", system="Be brief."), 0) == "Be brief. USER: Hi ASSISTANT:"


def test_images_without_placeholders_lead_the_first_user_message():
    msgs = conversation("Compare them.", "They differ.", "How?")
    assert build_prompt(msgs, 2) == conv_bunny_prompt(["<image>\n<image>\nCompare them.", "They differ.", "How?"])
    placed = conversation("First <image> then", "ok", "now <image>")
    assert build_prompt(placed, 2) == conv_bunny_prompt(["First <image> then", "ok", "now <image>"])
    assert build_prompt("raw <image> text", 1, apply_chat_template=False) == "raw <image> text"
    assert build_prompt("raw", 2, apply_chat_template=False) == "<image>\n<image>\nraw"


@pytest.mark.parametrize("messages, needle", [
    (conversation("a", "b"), "the last message must be the user's"),
    ([Message("assistant", "a")], "where the user's should be"),
    ([Message("user", "a"), Message("user", "b")], "where the assistant's should be"),
    ([Message("system", "s")], "no user message"),
    ([Message("user", "a"), Message("assistant", "")], "message 1 (assistant) is empty"),
])
def test_bad_conversations_are_named(messages, needle):
    with pytest.raises(ConversationError) as err:
        build_prompt(messages, 0)
    assert needle in str(err.value)
    with pytest.raises(ConversationError, match="apply_chat_template false"):
        build_prompt(conversation("a"), 0, apply_chat_template=False)


# ---- through the engine, against the transformers composition ------------------------------------------------

@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=6, num_kv_heads=2)


@pytest.fixture(scope="module")
def engine(model_path):
    return make_engine(model_path, max_images_per_request=3)


@pytest.fixture(scope="module")
def reference(model_path):
    return ReferenceBunny.from_pretrained(model_path), load_tokenizer(model_path)


def engine_greedy(engine, prompt, images, max_tokens=12) -> list[int]:
    engine.add_request("r", prompt, images, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    ids = []
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.delta_token_ids
            assert out.error is None, out.error
    return ids


CASES = {
    "3-turn text": (["What is a rabbit?", "An animal with long ears.", "What does it eat?"], 0),
    "3-turn, image first": (["<image>\nWhat is in the picture?", "A person.", "What colour is the sky?"], 1),
    "2 images, placed": (["Look: <image>", "Nice.", "And this one? <image>\nCompare them."], 2),
    "3 images, no placeholders": (["Describe the pictures.", "Three scenes.", "Which is darkest?"], 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conversations_match_the_reference(engine, reference, test_images, case):
    ref, tok = reference
    turns, n = CASES[case]
    images = test_images[:n]
    messages = conversation(*turns)
    prompt_turns = list(turns)
    if n and not any("<image>" in t for t in turns):
        prompt_turns[0] = "<image>\n" * n + prompt_turns[0]
    ids = bunny_tokens(tok, conv_bunny_prompt(prompt_turns))
    assert tokenize_prompt(tok, build_prompt(messages, n), num_images=n) == ids
    expected = ref.generate_greedy(ids, ref.pixel_values(images), max_new_tokens=12)
    assert engine_greedy(engine, messages, images) == expected


def test_placeholder_and_image_counts_must_match(engine, test_images):
    cases = [("<image> what is this?", [], "1 <image> placeholder(s) but 0 image(s)"),
             ("<image> and <image>", test_images[:1], "2 <image> placeholder(s) but 1 image(s)"),
             (conversation("Look <image>", "ok", "and?"), test_images[:2], "1 <image> placeholder(s) but 2")]
    for prompt, images, needle in cases:
        with pytest.raises(BadRequestError) as err:
            engine.add_request("bad", prompt, images, SamplingParams())
        assert needle in str(err.value)
    with pytest.raises(BadRequestError, match=r"4 images given; this model takes at most 3 \(max_images_per_request\)"):
        engine.add_request("bad", "hi", test_images[:4], SamplingParams())
    assert not engine.has_unfinished()
