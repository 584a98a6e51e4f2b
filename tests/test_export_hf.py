"""tools/export_hf: the Qwen2 and LLaVA folders load in transformers and give our model's logits on the same weights;
their tokenizer, chat template and image processor reproduce Bunny's prompt ids and pixels (square images)."""
import io

import pytest
import torch
from PIL import Image

from bunny_backend.io.conversation import Message, build_prompt
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.model.loader import load_model
from bunny_backend.tools.export_hf import export_llava, export_qwen2
from model_helpers import dense_logits, expand, pixels_of, prompt_ids

TEXT = "Describe the image."


@pytest.fixture(scope="module")
def source(checkpoint_factory):
    # vocab padded past the tokenizer, as Qwen's is: the LLaVA folder's <image> token needs a free embedding row
    path = checkpoint_factory(seed=5, num_heads=4, num_kv_heads=2, vocab_size=1600)
    return path, load_model(path), load_tokenizer(path)


def test_qwen2_folder_gives_our_logits_and_prompt(source, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, ours, tok = source
    out = export_qwen2(path, tmp_path / "qwen2")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False, add_generation_prompt=True)
    assert prompt == build_prompt(TEXT, 0)
    ids = prompt_ids(tok, TEXT, False)
    assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, dense_logits(ours, ids, None), atol=1e-4, rtol=1e-4)


def test_llava_folder_gives_our_logits_prompt_and_pixels(source, tmp_path, test_images):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    path, ours, tok = source
    out = export_llava(path, tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    image = test_images[0]                                   # astronaut, 512x512: square
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == build_prompt(TEXT, 1)
    inputs = processor(text=prompt, images=Image.open(io.BytesIO(image)), return_tensors="pt")
    ids = prompt_ids(tok, TEXT, True)
    image_token = hf.config.image_token_id
    assert inputs["input_ids"][0].tolist() == [image_token if t < 0 else t for t in expand(ids, ours.num_image_tokens)]
    pixels = pixels_of(image, ours.config.vision.image_size)
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)
    with torch.inference_mode():
        theirs = hf(input_ids=inputs["input_ids"], pixel_values=pixels).logits[0]
    torch.testing.assert_close(theirs, dense_logits(ours, ids, pixels), atol=1e-4, rtol=1e-4)


def test_chat_template_renders_bunny_conversations(source, tmp_path):
    from transformers import AutoTokenizer
    path, _, _ = source
    hf_tok = AutoTokenizer.from_pretrained(export_qwen2(path, tmp_path / "qwen2"))
    turns = [("system", "You are terse."), ("user", "Hi."), ("assistant", "Hello."), ("user", "What is a rabbit?")]
    for conversation in (turns, turns[1:]):
        rendered = hf_tok.apply_chat_template([{"role": r, "content": c} for r, c in conversation], tokenize=False,
                                              add_generation_prompt=True)
        assert rendered == build_prompt([Message(r, c) for r, c in conversation], 0)
