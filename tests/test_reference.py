"""The transformers-composed reference: checkpoint formats, strict loading, greedy decoding sanity."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bunny_backend.io.prompt import build_prompt, tokenize_prompt
from bunny_backend.io.tokenizer import load_tokenizer, tokenizer_eos_id
from bunny_backend.tools.reference import ReferenceBunny


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    return ReferenceBunny.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def image_prompt(tok, ref, test_images):
    ids = tokenize_prompt(tok, build_prompt("Describe the picture in detail.", True), num_images=1)
    return ids, ref.pixel_values(test_images[1:2])


def test_shapes(ref, image_prompt, tok):
    ids, pixels = image_prompt
    assert ref.vision_features(pixels).shape == (1, 16, 32)        # (56 / 14)^2 patches, vision hidden 32
    assert ref.image_features(pixels).shape == (1, 16, 64)
    assert ref.embed(ids, pixels).shape == (1, len(ids) + 15, 64)
    assert ref.logits(ids, pixels).shape == (len(ids) + 15, len(tok))
    with pytest.raises(ValueError, match="placeholder"):
        ref.embed(ids, None)


@pytest.mark.parametrize("kwargs", [dict(shards=3), dict(fmt="bin"), dict(fmt="bin", shards=2),
                                    dict(include_dropped_layer=False)])
def test_formats_give_same_logits(checkpoint_factory, ref, image_prompt, kwargs):
    ids, pixels = image_prompt
    other = ReferenceBunny.from_pretrained(checkpoint_factory(**kwargs))
    torch.testing.assert_close(other.logits(ids, pixels), ref.logits(ids, pixels), rtol=0, atol=0)


def copy_with(tiny_checkpoint, tmp_path, edit):
    for f in tiny_checkpoint.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.mm_projector.2.bias",
                                  "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias",
                                  "lm_head.weight"])
def test_missing_tensor_is_named(tiny_checkpoint, tmp_path, name):
    path = copy_with(tiny_checkpoint, tmp_path, lambda t: t.pop(name))
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        ReferenceBunny.from_pretrained(path)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    path = copy_with(tiny_checkpoint, tmp_path, lambda t: t.update({"model.layers.9.extra": torch.zeros(1)}))
    with pytest.raises(KeyError, match=r"model\.layers\.9\.extra"):
        ReferenceBunny.from_pretrained(path)


def test_tied_embeddings(checkpoint_factory, tok):
    ref = ReferenceBunny.from_pretrained(checkpoint_factory(tie_word_embeddings=True))
    assert ref.lm.lm_head.weight.data_ptr() == ref.lm.model.embed_tokens.weight.data_ptr()
    logits = ref.logits(tokenize_prompt(tok, build_prompt("Hello", False)))
    assert 1 < logits.std() < 20


def test_greedy_is_decisive_and_matches_full_recompute(ref, image_prompt):
    ids, pixels = image_prompt
    new, step_logits = ref.generate_greedy(ids, pixels, max_new_tokens=32, return_logits=True)
    assert len(new) == 32 and step_logits.shape == (32, ref.lm.config.vocab_size)
    top2 = step_logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2             # no near-ties: engines can match exactly
    assert step_logits.abs().max() < 40
    full = ref.logits(ids + new[:-1], pixels)[-32:]            # the KV-cache path agrees with no cache
    assert full.argmax(-1).tolist() == new
    torch.testing.assert_close(full, step_logits, rtol=1e-4, atol=1e-4)


def test_image_changes_the_answer(ref, tok, test_images):
    with_image, text = ref.chat(tok, "What is in the picture?", test_images[0], max_new_tokens=8)
    without, _ = ref.chat(tok, "What is in the picture?", None, max_new_tokens=8)
    other, _ = ref.chat(tok, "What is in the picture?", test_images[2], max_new_tokens=8)
    assert isinstance(text, str) and len(with_image) <= 8
    assert with_image != without and with_image != other


def test_stops_at_eos(ref, image_prompt):
    ids, pixels = image_prompt
    first = ref.generate_greedy(ids, pixels, max_new_tokens=4)
    stop = first.index(first[2]) + 1                            # where that token first appears
    assert ref.generate_greedy(ids, pixels, max_new_tokens=32, eos_token_ids=[first[2]]) == first[:stop]


def test_bfloat16(tiny_checkpoint, image_prompt, tok):
    ids, pixels = image_prompt
    ref16 = ReferenceBunny.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert ref16.dtype == torch.bfloat16
    assert torch.isfinite(ref16.logits(ids, pixels)).all()
    assert tokenizer_eos_id(tok) == len(tok) - 3


def test_preprocessing_is_transformers_not_ours(ref, test_images):
    """The reference prepares images with transformers' SigLIP processor, so a bug in io/image.py cannot hide on
    both sides of a comparison (tests/test_image.py checks the two agree)."""
    import inspect

    from bunny_backend.tools import reference
    assert "from bunny_backend.io.image" not in inspect.getsource(reference)
    assert ref.pixel_values(test_images[:1]).shape == (1, 3, ref.image_size, ref.image_size)
