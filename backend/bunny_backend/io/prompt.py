"""Tokenization that leaves a placeholder id where each image goes (the template is in conversation.py)."""
from __future__ import annotations

from .conversation import IMAGE_TOKEN, SYSTEM_PROMPT, build_prompt  # noqa: F401 - the template's home

# LLaVA's placeholder id, never a real token: one per `<image>` after tokenizing, and one per image feature row
# once the engine expands it (the model puts the features at those rows).
IMAGE_TOKEN_INDEX = -200


def count_image_tags(prompt: str) -> int:
    return prompt.count(IMAGE_TOKEN)


def check_image_count(prompt: str, num_images: int) -> None:
    tags = count_image_tags(prompt)
    if tags != num_images:
        raise ValueError(f"the prompt has {tags} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s) were "
                         f"given; each image needs exactly one {IMAGE_TOKEN} and each {IMAGE_TOKEN} an image")


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

