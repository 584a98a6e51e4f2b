"""Shared helpers for model-level tests: run our model without a KV cache, expand image placeholders."""
import torch

from bunny_backend.io.image import decode_image, preprocess_image
from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt
from bunny_backend.utils.context import ForwardContext, reset_context, set_context


def prompt_ids(tokenizer, text, has_image):
    return tokenize_prompt(tokenizer, build_prompt(text, int(has_image)))


def pixels_of(image_bytes, image_size):
    if image_bytes is None:
        return None
    return preprocess_image(decode_image(image_bytes), image_size).unsqueeze(0)


def expand(ids, num_image_tokens):
    out = []
    for t in ids:
        out += [IMAGE_TOKEN_INDEX] * num_image_tokens if t == IMAGE_TOKEN_INDEX else [t]
    return out


def dense_prefill_context(length: int) -> ForwardContext:
    """Context for a cache-less causal forward over one sequence."""
    cu = torch.tensor([0, length], dtype=torch.int32)
    return ForwardContext(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=length, seqlens_q=[length],
                          seqlens_k=[length])


@torch.inference_mode()
def dense_logits(model, ids, pixels):
    """Logits [L, V] of our model for unexpanded ids (with IMAGE_TOKEN_INDEX), no cache."""
    full = torch.tensor(expand(ids, model.num_image_tokens))
    image_embeds = model.encode_images(pixels)[0] if pixels is not None else None
    set_context(dense_prefill_context(len(full)))
    try:
        hidden = model(model.embed_inputs(full, image_embeds), torch.arange(len(full)))
    finally:
        reset_context()
    return model.compute_logits(hidden)


def dense_greedy(model, ids, pixels, max_new_tokens):
    ids, out = list(ids), []
    for _ in range(max_new_tokens):
        token = int(dense_logits(model, ids, pixels)[-1].argmax())
        out.append(token)
        ids.append(token)
    return out


# bf16 against fp32 cannot be compared token for token over long greedy runs: random-weight models have near-ties
# that rounding flips, and one flip changes everything after it. So logits are compared position by position on the
# same inputs (teacher forcing): a relative error, and the share of positions whose top-1 token agrees.
BF16_REL_ERR = 3e-2       # ||logits - ref|| / ||ref||; bf16 weights and activations land around 1e-2
TOP1_AGREEMENT = 0.9      # share of positions where the bf16 argmax is the fp32 argmax


def agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.float().cpu(), want.float().cpu()
    rel = float((got - want).norm() / want.norm())
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    return rel, top1


def teacher_forced(ref, other, tokenizer, questions, images, device="cpu", new_tokens=24):
    """ref's greedy continuation of each (question, image) scored at every position by both models (other runs
    on `device`): (other's logits, ref's logits), each concatenated over the prompts."""
    got, want = [], []
    for question, image in zip(questions, images):
        ids = prompt_ids(tokenizer, question, image is not None)
        pixels = pixels_of(image, ref.config.vision.image_size)
        full = ids + dense_greedy(ref, ids, pixels, new_tokens)
        want.append(dense_logits(ref, full, pixels))
        with torch.device(device):
            got.append(dense_logits(other, full, None if pixels is None else pixels.to(device)))
    return torch.cat(got), torch.cat(want)


# Bunny's conv_bunny template (BAAI-DCAI/Bunny), written out here rather than taken from io/conversation.py.
BUNNY_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def image_feature_rows(model_path) -> int:
    """Image rows per image from config.json: (image_size // patch_size) ** 2; so400m (no vision_config) is
    384 px at patch 14: 27 * 27 = 729."""
    import json
    from pathlib import Path
    vision = json.loads((Path(model_path) / "config.json").read_text()).get("vision_config") or {}
    return (vision.get("image_size", 384) // vision.get("patch_size", 14)) ** 2


def expected_prompt_tokens(model_path, question: str, num_images: int) -> int:
    """prompt_tokens of one user question with `num_images` images placed before it: the template's text around the
    images counted with the checkpoint's tokenizer, plus each image's feature rows."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_path))
    before = f"{BUNNY_SYSTEM} USER: "
    after = f"{question} ASSISTANT:"
    pieces = [before] + ["\n"] * (num_images - 1) + ["\n" + after] if num_images else [before + after]
    text_tokens = sum(len(tok.encode(p, add_special_tokens=False)) for p in pieces)
    return text_tokens + num_images * image_feature_rows(model_path)


def settled_text(tokenizer, ids) -> str:
    """The text of `ids` that can no longer change: a trailing U+FFFD is an unfinished UTF-8 sequence."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def stop_cases(tokenizer, text: str, ids: list[int]):
    """From an unstopped greedy answer: a stop string spanning a token boundary, and one whose prefix appears but
    which never completes. Each with what must come back: (stop, text, ids, finish_reason)."""
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for k in range(6, len(ids) - 6):   # a boundary between two tokens of settled, clean text
        boundary = len(settled_text(tokenizer, ids[:k]))
        spanning = text[boundary - 2:boundary + 3]
        if (text.startswith(settled_text(tokenizer, ids[:k])) and boundary >= 2 and len(spanning) == 5
                and "\ufffd" not in spanning and spanning.strip() and len(settled_text(tokenizer, ids[:k + 1])) > boundary):
            break
    else:
        raise AssertionError(f"no clean token boundary in {text!r}")
    # the oracle: cut before the first match; the ids up to the first token whose settled text completes the match
    upto = next(k for k in range(1, len(ids) + 1) if spanning in settled_text(tokenizer, ids[:k]))
    partial = spanning + "\x07\x07"   # its first five characters match, then never
    assert partial not in text
    return [(spanning, text[:text.index(spanning)], ids[:upto], "stop"), (partial, text, ids, "length")]
