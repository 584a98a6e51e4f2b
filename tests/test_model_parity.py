"""Model level: our Bunny against the transformers-composed reference on the same random weights (fp32)."""
import pytest
import torch

from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.model.loader import CheckpointError, load_model
from bunny_backend.tools.reference import ReferenceBunny
from model_helpers import dense_greedy, dense_logits, pixels_of, prompt_ids

CONFIGS = {
    "mha-untied-seed0": dict(seed=0, num_heads=4, num_kv_heads=4, tie_word_embeddings=False),
    "gqa-tied-seed1": dict(seed=1, num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "gqa-untied-seed2": dict(seed=2, num_heads=8, num_kv_heads=2, tie_word_embeddings=False),
}
PROMPTS = {
    "text": ("What is a rabbit?", None),
    "square-image": ("Describe the image.", 0),
    "nonsquare-image": ("What is in this picture?", 1),
    "chinese": ("请描述这张图片。", 1),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, checkpoint_factory):
    path = checkpoint_factory(**CONFIGS[request.param])
    return load_model(path), ReferenceBunny.from_pretrained(path), load_tokenizer(path)


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_and_greedy_match_reference(pair, prompt, test_images):
    ours, ref, tok = pair
    text, image_index = PROMPTS[prompt]
    image = None if image_index is None else test_images[image_index]
    pixels = pixels_of(image, ours.config.vision.image_size)
    ids = prompt_ids(tok, text, image is not None)
    with torch.inference_mode():
        if pixels is not None:
            torch.testing.assert_close(ours.vision_features(pixels), ref.vision_features(pixels), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours.encode_images(pixels), ref.image_features(pixels), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dense_logits(ours, ids, pixels), ref.logits(ids, pixels), atol=1e-4, rtol=1e-4)
    expected = ref.generate_greedy(ids, pixels, max_new_tokens=32)
    assert dense_greedy(ours, ids, pixels, 32) == expected


def test_sharded_safetensors_and_bin_load_to_same_logits(checkpoint_factory, test_images):
    kwargs = dict(seed=3, num_kv_heads=2)
    paths = [checkpoint_factory(**kwargs), checkpoint_factory(**kwargs, shards=3),
             checkpoint_factory(**kwargs, fmt="bin"), checkpoint_factory(**kwargs, fmt="bin", shards=2)]
    tok = load_tokenizer(paths[0])
    ids = prompt_ids(tok, "Describe the image.", True)
    logits = []
    for path in paths:
        model = load_model(path)
        logits.append(dense_logits(model, ids, pixels_of(test_images[0], model.config.vision.image_size)))
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], atol=0, rtol=0)


def test_missing_tensor_is_named(checkpoint_factory, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    src = checkpoint_factory(seed=4)
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(dst)


def test_unexpected_tensor_is_named(checkpoint_factory, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    dst = tmp_path / "extra"
    shutil.copytree(checkpoint_factory(seed=4), dst)
    state = load_file(dst / "model.safetensors")
    state["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(state, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match="mystery"):
        load_model(dst)


def test_bfloat16_load(checkpoint_factory):
    model = load_model(checkpoint_factory(seed=0), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
