"""Bunny's `config.json`: the Qwen2 text fields at top level and SigLIP's `vision_config` (docs/api/triton-model.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class VisionConfig:
    # SigLIP-so400m-patch14-384, used when config.json has no vision_config
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_used_layers(self) -> int:
        return self.num_hidden_layers - 1   # Bunny drops SigLIP's last encoder layer


@dataclass(slots=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int
    num_key_value_heads: int = 0
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("config.json: hidden_size, num_attention_heads and num_key_value_heads do not divide")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(slots=True)
class BunnyConfig:
    text: TextConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    mm_hidden_size: int = 1152
    tokenizer_model_max_length: int = 0   # the context Bunny was trained at (2048 for v1.0); 0: not given

    @classmethod
    def from_dict(cls, raw: dict) -> "BunnyConfig":
        projector = raw.get("mm_projector_type", "mlp2x_gelu")
        if projector != "mlp2x_gelu":
            raise ValueError(f"config.json: mm_projector_type {projector!r} is not supported (only mlp2x_gelu)")
        text = TextConfig(**{k: raw[k] for k in TextConfig.__dataclass_fields__ if k in raw})
        vision_raw = raw.get("vision_config") or {}
        vision = VisionConfig(**{k: vision_raw[k] for k in VisionConfig.__dataclass_fields__ if k in vision_raw})
        return cls(text=text, vision=vision, mm_hidden_size=raw.get("mm_hidden_size", vision.hidden_size),
                   tokenizer_model_max_length=int(raw.get("tokenizer_model_max_length") or 0))

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> "BunnyConfig":
        path = Path(model_path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model path {model_path}")
        return cls.from_dict(json.loads(path.read_text()))

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def context_length(self) -> int:
        """The default max_model_len: the trained context where config.json gives it, else the position limit."""
        limit = self.text.max_position_embeddings
        return min(self.tokenizer_model_max_length, limit) if self.tokenizer_model_max_length else limit
