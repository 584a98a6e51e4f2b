"""Bunny's chat template and the tokenization that leaves a placeholder id where each image goes."""
from __future__ import annotations

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200   # LLaVA's placeholder id; never a real token
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def count_image_tags(prompt: str) -> int:
    return prompt.count(IMAGE_TOKEN)


def build_prompt(text: str, has_image: bool, apply_chat_template: bool = True) -> str:
    """The prompt string for one request.

    With the template on, the image tag leads the user's turn (CONTRACT.md section 2). Either way a text that
    already holds an `<image>` tag keeps it where the user put it, and no second one is added.
    """
    if has_image and IMAGE_TOKEN not in text:
        text = f"{IMAGE_TOKEN}\n{text}"
    if not apply_chat_template:
        return text
    return f"{SYSTEM_PROMPT} USER: {text} ASSISTANT:"


def check_image_count(prompt: str, num_images: int) -> None:
    tags = count_image_tags(prompt)
    if tags != num_images:
        raise ValueError(f"the prompt has {tags} {IMAGE_TOKEN} tag(s) but {num_images} image(s) were given; "
                         f"each image needs exactly one {IMAGE_TOKEN} tag")


def tokenize_prompt(tokenizer, prompt: str, num_images: int | None = None) -> list[int]:
    """Token ids with IMAGE_TOKEN_INDEX at each `<image>`; each text chunk is tokenized on its own.

    When `num_images` is given, the tag count must match it (ValueError otherwise).
    """
    if num_images is not None:
        check_image_count(prompt, num_images)
    ids: list[int] = []
    for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids


def count_prompt_tokens(ids: list[int], tokens_per_image: int) -> int:
    """Length of the prompt once each placeholder is replaced by the image's feature rows."""
    images = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
    return len(ids) + images * (tokens_per_image - 1)
