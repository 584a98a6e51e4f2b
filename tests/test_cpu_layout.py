"""The CPU weight layout (transposed linears) computes what nn.Linear computes."""
import pytest
import torch

from bunny_backend.model.cpu_layout import OneDnnLinear, PanelLinear, TransposedLinear, use_cpu_linears
from cpu_kernel_helpers import require_panel_linear
from bunny_backend.model.loader import load_model
from model_helpers import dense_logits, pixels_of, prompt_ids
from bunny_backend.io.tokenizer import load_tokenizer


@pytest.mark.parametrize("cls", [OneDnnLinear, TransposedLinear, PanelLinear])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 32), (7, 32), (2, 3, 32)])
def test_cpu_linear_matches_linear(monkeypatch, cls, bias, shape):
    if cls is OneDnnLinear and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    if cls is PanelLinear:
        require_panel_linear(monkeypatch, torch.float32)
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48, bias=bias)
    x = torch.randn(*shape)
    torch.testing.assert_close(cls(lin)(x), lin(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [None, TransposedLinear, OneDnnLinear])
@pytest.mark.parametrize("tied", [False, True])
def test_model_logits_unchanged(checkpoint_factory, test_images, tied, cls):
    path = checkpoint_factory(seed=6, tie_word_embeddings=tied)
    model = load_model(path)
    ids = prompt_ids(load_tokenizer(path), "Describe the image.", True)
    pixels = pixels_of(test_images[1], model.config.vision.image_size)
    before = dense_logits(model, ids, pixels)
    use_cpu_linears(model, cls)
    converted = [m for m in model.modules() if isinstance(m, (OneDnnLinear, TransposedLinear, PanelLinear))]
    assert any(m in converted for m in model.model.vision_tower.modules())   # the tower's and projector's too
    assert not any(type(m) is torch.nn.Linear for m in model.modules() if m is not model.lm_head)
    # float32 sums in another order through every layer, the vision tower's included
    torch.testing.assert_close(dense_logits(model, ids, pixels), before, atol=5e-5, rtol=1e-4)
