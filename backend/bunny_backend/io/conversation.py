"""Bunny's conversation template (`conv_bunny` in BAAI-DCAI/Bunny): the one place where a chat becomes a prompt.

    {system} USER: {m1} ASSISTANT: {a1}<|endoftext|>USER: {m2} ASSISTANT:

A single `text_input` is the conversation of one user message. `<image>` in a message marks where an image goes;
images given without any placeholder go to the start of the first user message, one `<image>\\n` each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .tokenizer import EOS_TOKEN

IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLE_NAMES = {"user": "USER", "assistant": "ASSISTANT"}
SEP = " "           # after the system text and after each user message
SEP2 = EOS_TOKEN    # after each finished assistant answer


class ConversationError(ValueError):
    """A conversation the template cannot render; the message says which message is wrong and why."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str       # "system", "user" or "assistant"
    content: str


def parse_messages(items) -> list[Message]:
    """`[{"role": ..., "content": "..."}, ...]` (decoded JSON) -> checked Messages; ConversationError otherwise."""
    if not isinstance(items, list) or not items:
        raise ConversationError("messages must be a non-empty JSON list of {\"role\", \"content\"} objects")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise ConversationError(f"message {i} must be an object with a \"role\" and a \"content\"")
        extra = sorted(set(item) - {"role", "content"})
        if extra:
            raise ConversationError(f"message {i} has unknown field(s) {extra}; a message has role and content")
        if not isinstance(item.get("content"), str):
            raise ConversationError(f"message {i} ({item['role']}): content must be a string")
        messages.append(Message(item["role"], item["content"]))
    check_turns(messages)
    return messages


def check_turns(messages: Sequence[Message]) -> None:
    """An optional system message first, then user and assistant taking turns, ending with the user's."""
    turns = list(messages)
    if turns and turns[0].role == "system":
        turns = turns[1:]
    offset = len(messages) - len(turns)
    if not turns:
        raise ConversationError("the conversation has no user message")
    for i, m in enumerate(turns):
        k, expected = i + offset, ("user" if i % 2 == 0 else "assistant")
        if m.role not in ("system", "user", "assistant"):
            raise ConversationError(f"message {k} has role {m.role!r}; roles are system, user and assistant")
        if m.role == "system":
            raise ConversationError(f"message {k} is a system message; only the first message may be one")
        if m.role != expected:
            raise ConversationError(f"message {k} is the {m.role}'s where the {expected}'s should be: user and "
                                    "assistant messages take turns, starting with the user")
        if not m.content.strip():
            raise ConversationError(f"message {k} ({m.role}) is empty")
    if turns[-1].role != "user":
        raise ConversationError("the last message must be the user's: the model answers it")


def build_prompt(conversation: str | Sequence[Message], num_images: int, apply_chat_template: bool = True) -> str:
    """The prompt string: a text (one user message, or with the template off the whole prompt) or a conversation.

    `num_images` images with no `<image>` anywhere are placed at the start of the first user message (of the text
    when the template is off). Whether the placeholders then match the images is tokenize_prompt's check.
    """
    if isinstance(conversation, str):
        if not apply_chat_template:
            return _with_images(conversation, num_images)
        conversation = [Message("user", conversation)]
    elif not apply_chat_template:
        raise ConversationError("apply_chat_template false takes a text_input prompt, not messages")
    messages = list(conversation)
    check_turns(messages)
    if num_images and not any(IMAGE_TOKEN in m.content for m in messages):
        first = next(i for i, m in enumerate(messages) if m.role == "user")
        messages[first] = Message("user", _with_images(messages[first].content, num_images))
    system = SYSTEM_PROMPT
    if messages[0].role == "system":
        system, messages = messages[0].content, messages[1:]
    prompt = system + SEP
    for i, m in enumerate(messages):
        prompt += f"{ROLE_NAMES[m.role]}: {m.content}{SEP if i % 2 == 0 else SEP2}"
    return prompt + f"{ROLE_NAMES['assistant']}:"


def _with_images(text: str, num_images: int) -> str:
    if num_images and IMAGE_TOKEN not in text:
        return f"{IMAGE_TOKEN}\n" * num_images + text
    return text
