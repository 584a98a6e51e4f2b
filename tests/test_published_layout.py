"""The published checkpoint's layout end to end: config.json without `vision_config`, so the tower is
SigLIP-so400m-patch14-384 (27 layers of which 26 are used, 384 px, 729 image tokens), under a tiny LLM. One image,
a few greedy tokens: the engine gives the transformers-composed reference's ids."""
import json

import pytest
import torch

from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.tools.demo_checkpoint import build_checkpoint
from bunny_backend.tools.reference import ReferenceBunny
from engine_helpers import make_engine, run_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def so400m_checkpoint(tmp_path_factory):
    # bfloat16 on disk halves the 430M tower's file; both sides compute in float32.
    return build_checkpoint(tmp_path_factory.mktemp("so400m"), seed=2, so400m_tower=True,
                            include_dropped_layer=False, dtype=torch.bfloat16, tokenizer_model_max_length=2048)


def test_image_path_without_vision_config(so400m_checkpoint, test_images):
    config = json.loads((so400m_checkpoint / "config.json").read_text())
    assert "vision_config" not in config and config["mm_hidden_size"] == 1152
    engine = make_engine(so400m_checkpoint, max_num_batched_tokens=1024)
    vision = engine.model.config.vision
    assert (vision.num_hidden_layers, vision.image_size, engine.model.num_image_tokens) == (27, 384, 729)
    assert len(engine.model.model.vision_tower.vision_tower.vision_model.encoder.layers) == 26
    text = "Describe the image."
    ids, _, _ = run_all(engine, [(0, "img", text, [test_images[1]], SamplingParams(max_tokens=6))])["img"]
    del engine
    reference = ReferenceBunny.from_pretrained(so400m_checkpoint)
    assert reference.vision_tower.config.num_hidden_layers == 27
    expected, _ = reference.chat(load_tokenizer(so400m_checkpoint), text, test_images[1], max_new_tokens=6)
    assert ids == expected and len(ids) >= 1
