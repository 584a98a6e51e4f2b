"""A numerical reference for Bunny built from transformers' own SigLIP and Qwen2 classes and SigLIP's image
processor, as Bunny composes them.

Independent of `bunny_backend.model` and of the engine's image preprocessing (`bunny_backend.io.image`): tests
compare our engine against it on the same checkpoint, and `bunny-client reference` captions with it. It shares
the prompt template and the choice of EOS ids with the engine.
"""
from __future__ import annotations

import io
import json
from collections.abc import Collection
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import nn

from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt
from bunny_backend.io.tokenizer import eos_token_ids

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", num_channels=3)


def _hide_broken_torchvision() -> None:
    """transformers imports torchvision whenever it is installed; one built for another torch (PyPI's CUDA wheel
    beside a CPU torch) breaks every model import, so let transformers treat it as absent."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure: unusable either way
        import transformers.utils as utils
        import transformers.utils.import_utils as import_utils
        for module in (utils, import_utils):
            module.is_torchvision_available = lambda: False
            module.is_torchvision_v2_available = lambda: False


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Bunny's own padding (bunny/util/mm_utils.py): the picture centred on a square of `background`."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def reference_pixels(images: list[bytes], image_size: int) -> torch.Tensor:
    """Encoded images -> [n, 3, S, S] as Bunny prepares them: RGB (upright per EXIF), expand2square with the
    processor's mean as background, then transformers' SigLIP image processor (bicubic resize, 1/255, mean/std
    0.5). The PIL variant of the processor: the default one needs torchvision, which the CPU venv must not hold."""
    _hide_broken_torchvision()
    from transformers import SiglipImageProcessorPil
    processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, resample=3,
                                        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    background = tuple(int(m * 255) for m in processor.image_mean)
    squares = []
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            squares.append(expand2square(ImageOps.exif_transpose(img).convert("RGB"), background))
    return processor(squares, return_tensors="pt")["pixel_values"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: safetensors or pytorch_model .bin, single file or sharded."""
    from safetensors.torch import load_file
    path = Path(path)
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        if (path / index_name).is_file():
            files = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            return {k: v for f in files for k, v in loader(str(path / f)).items()}
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return _load_bin(str(path / "pytorch_model.bin"))
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or shard index in {path}")


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def _load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, optional: set[str]) -> None:
    """Load `tensors` (names relative to the module) and fail naming any missing or unexpected checkpoint key."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(tensors) - optional)
    unexpected = sorted(set(tensors) - expected)
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {prefix}{missing[0]}")
    if unexpected:
        raise KeyError(f"checkpoint has unexpected tensor(s), e.g. {prefix}{unexpected[0]}")
    module.load_state_dict(tensors, strict=False)


class ReferenceBunny(nn.Module):
    def __init__(self, config: dict, vision_tower: nn.Module, projector: nn.Module, lm: nn.Module):
        super().__init__()
        self.config = config
        self.vision_tower, self.projector, self.lm = vision_tower, projector, lm
        self.image_size = vision_tower.config.image_size
        self.model_path: Path | None = None   # set by from_pretrained; chat() reads the EOS ids from it

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        _hide_broken_torchvision()
        from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        vcfg = SiglipVisionConfig(**{**SO400M, **(config.get("vision_config") or {})}, vision_use_head=False)
        vcfg._attn_implementation = "eager"
        tower = SiglipVisionModel(vcfg)
        text_fields = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                       "num_hidden_layers", "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                       "tie_word_embeddings", "hidden_act")
        tcfg = Qwen2Config(**{k: config[k] for k in text_fields if k in config})
        tcfg._attn_implementation = "eager"
        lm = Qwen2ForCausalLM(tcfg)
        mm_hidden = config.get("mm_hidden_size", vcfg.hidden_size)
        projector = nn.Sequential(nn.Linear(mm_hidden, tcfg.hidden_size), nn.GELU(),
                                  nn.Linear(tcfg.hidden_size, tcfg.hidden_size))

        state = read_state_dict(path)
        vision = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
        if any(k.startswith("vision_model.") for k in tower.state_dict()):     # transformers 4 naming
            vision = {"vision_model." + k: v for k, v in vision.items()}
        # The dropped last layer and post_layernorm do not reach hidden_states[-2]; head is disabled.
        last = f"encoder.layers.{vcfg.num_hidden_layers - 1}."
        ignorable = {k for k in tower.state_dict() if last in k or "post_layernorm." in k}
        vision = {k: v for k, v in vision.items() if not k.startswith(("head.", "vision_model.head."))}
        _load_strict(tower, vision, VISION_PREFIX, ignorable)
        proj = {k[len(PROJECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
        _load_strict(projector, proj, PROJECTOR_PREFIX, set())
        text = {k: v for k, v in state.items()
                if not k.startswith(("model.vision_tower.", PROJECTOR_PREFIX))}
        _load_strict(lm, text, "", {"lm_head.weight"} if tcfg.tie_word_embeddings else set())
        if tcfg.tie_word_embeddings:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        model = cls(config, tower, projector, lm).to(device=device, dtype=dtype).eval()
        model.model_path = path
        return model

    def pixel_values(self, images: list[bytes]) -> torch.Tensor | None:
        return reference_pixels(images, self.image_size) if images else None

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device

    @torch.inference_mode()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, T, vision hidden]: hidden states after the tower's second-to-last layer."""
        out = self.vision_tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2]

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, T, hidden]: vision features through the projector."""
        return self.projector(self.vision_features(pixel_values))

    @torch.inference_mode()
    def embed(self, input_ids: list[int], pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds [1, L, hidden], each IMAGE_TOKEN_INDEX replaced by one image's T feature rows."""
        n_tags = sum(1 for t in input_ids if t == IMAGE_TOKEN_INDEX)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_tags != n_images:
            raise ValueError(f"{n_tags} image placeholder(s) in input_ids but {n_images} image(s)")
        feats = self.image_features(pixel_values) if n_images else None
        table = self.lm.get_input_embeddings()
        pieces, text, image_i = [], [], 0
        for t in list(input_ids) + [None]:
            if t is not None and t != IMAGE_TOKEN_INDEX:
                text.append(t)
                continue
            if text:
                pieces.append(table(torch.tensor(text, device=self.device)))
                text = []
            if t == IMAGE_TOKEN_INDEX:
                pieces.append(feats[image_i])
                image_i += 1
        return torch.cat(pieces).unsqueeze(0)

    @torch.inference_mode()
    def logits(self, input_ids: list[int], pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """[L, vocab] float32 logits for every prompt position (image rows included)."""
        out = self.lm(inputs_embeds=self.embed(input_ids, pixel_values), use_cache=False)
        return out.logits[0].float()

    @torch.inference_mode()
    def generate_greedy(self, input_ids: list[int], pixel_values: torch.Tensor | None = None,
                        max_new_tokens: int = 32, eos_token_ids: Collection[int] = (), return_logits: bool = False):
        """Greedy new token ids (an EOS id included when reached) using HF's KV cache; with return_logits, also the
        [n, vocab] float32 logits each choice was made from."""
        out = self.lm(inputs_embeds=self.embed(input_ids, pixel_values), use_cache=True)
        ids, rows = [], []
        for step in range(max_new_tokens):
            row = out.logits[0, -1].float()
            token = int(row.argmax())
            ids.append(token)
            rows.append(row)
            if token in eos_token_ids or step == max_new_tokens - 1:
                break
            out = self.lm(input_ids=torch.tensor([[token]], device=self.device),
                          past_key_values=out.past_key_values, use_cache=True)
        if return_logits:
            return ids, torch.stack(rows) if rows else torch.empty(0, self.lm.config.vocab_size)
        return ids

    def chat(self, tokenizer, text: str, image_bytes: bytes | None = None, max_new_tokens: int = 32,
             apply_chat_template: bool = True) -> tuple[list[int], str]:
        """One greedy chat turn as the server would run it: (new ids, decoded text without special tokens)."""
        images = [image_bytes] if image_bytes is not None else []
        prompt = build_prompt(text, bool(images), apply_chat_template)
        ids = tokenize_prompt(tokenizer, prompt, num_images=len(images))
        new = self.generate_greedy(ids, self.pixel_values(images), max_new_tokens,
                                   eos_token_ids(self.model_path, tokenizer))
        return new, tokenizer.decode(new, skip_special_tokens=True)
