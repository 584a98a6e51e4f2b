"""Write a small random-weight Bunny checkpoint in the published layout (docs/api/triton-model.md).

Tests build tiny ones; `python -m bunny_backend.tools.demo_checkpoint --out models/bunny-demo` builds the demo.
The tokenizer is a byte-level BPE trained on the bundled English/Chinese corpus with Qwen2's pre-tokenizer.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from bunny_backend.model.config import VisionConfig

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "demo_corpus.txt"
EXAMPLE_IMAGE = HERE / "example.png"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer), so vocab.json + merges.txt tokenize the same
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json",
                   "pytorch_model*.bin", "pytorch_model.bin.index.json")


@functools.lru_cache(maxsize=4)
def train_tokenizer(vocab_size: int = 1536) -> str:
    """The trained tokenizer as tokenizer.json text; special tokens sit at the end of the vocabulary, as in Qwen."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok.to_str()


def write_tokenizer(out: Path) -> tuple[int, int]:
    """tokenizer.json, vocab.json + merges.txt and tokenizer_config.json; returns (vocabulary size, EOS id)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(train_tokenizer())
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))                              # vocab.json + merges.txt (without the special tokens)
    decoder = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": decoder,
              "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None, "eos_token": SPECIAL_TOKENS[0],
              "pad_token": SPECIAL_TOKENS[0], "unk_token": None, "clean_up_tokenization_spaces": False,
              "model_max_length": 32768, "errors": "replace"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return tok.get_vocab_size(), tok.token_to_id(SPECIAL_TOKENS[0])


def make_weights(cfg: dict, vis: dict, *, seed: int, std: float | None,
                 include_dropped_layer: bool) -> dict[str, torch.Tensor]:
    """Random float32 weights for config.json `cfg` and vision tower `vis`; default scales keep activations O(1)
    and logits' spread around 5."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    weights: dict[str, torch.Tensor] = {}

    def normal(name, shape, scale):
        weights[name] = torch.randn(shape, generator=gen) * (std if std is not None else scale)

    def linear(name, n_out, n_in, bias=True):
        normal(f"{name}.weight", (n_out, n_in), 1 / math.sqrt(n_in))
        if bias:
            weights[f"{name}.bias"] = torch.randn(n_out, generator=gen) * 0.02

    def norm(name, size, bias=False):
        weights[f"{name}.weight"] = 1 + 0.1 * torch.randn(size, generator=gen)
        if bias:
            weights[f"{name}.bias"] = 0.02 * torch.randn(size, generator=gen)

    vh, vp = vis["hidden_size"], vis["patch_size"]
    normal(f"{VISION_PREFIX}embeddings.patch_embedding.weight", (vh, 3, vp, vp), 1 / math.sqrt(3 * vp * vp))
    weights[f"{VISION_PREFIX}embeddings.patch_embedding.bias"] = 0.02 * torch.randn(vh, generator=gen)
    normal(f"{VISION_PREFIX}embeddings.position_embedding.weight", ((vis["image_size"] // vp) ** 2, vh), 0.5)
    for i in range(vis["num_hidden_layers"]):
        p = f"{VISION_PREFIX}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(p + "self_attn." + proj, vh, vh)
        norm(p + "layer_norm1", vh, bias=True)
        norm(p + "layer_norm2", vh, bias=True)
        linear(p + "mlp.fc1", vis["intermediate_size"], vh)
        linear(p + "mlp.fc2", vh, vis["intermediate_size"])
    norm(f"{VISION_PREFIX}post_layernorm", vh, bias=True)
    if not include_dropped_layer:      # drawn anyway so the other weights match a build that keeps them
        last = f"{VISION_PREFIX}encoder.layers.{vis['num_hidden_layers'] - 1}."
        for name in [n for n in weights if n.startswith(last) or ".post_layernorm." in n]:
            del weights[name]

    linear("model.mm_projector.0", h, cfg["mm_hidden_size"])
    linear("model.mm_projector.2", h, h)
    tied = cfg["tie_word_embeddings"]
    normal("model.embed_tokens.weight", (vocab, h), 5 / math.sqrt(h) if tied else 1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        linear(p + "self_attn.q_proj", h, h)
        linear(p + "self_attn.k_proj", kv, h)
        linear(p + "self_attn.v_proj", kv, h)
        linear(p + "self_attn.o_proj", h, h, bias=False)
        linear(p + "mlp.gate_proj", inter, h, bias=False)
        linear(p + "mlp.up_proj", inter, h, bias=False)
        linear(p + "mlp.down_proj", h, inter, bias=False)
        norm(p + "input_layernorm", h)
        norm(p + "post_attention_layernorm", h)
    norm("model.norm", h)
    if not tied:
        normal("lm_head.weight", (vocab, h), 5 / math.sqrt(h))
    return weights


def write_weights(out: Path, weights: dict[str, torch.Tensor], shards: int, fmt: str) -> None:
    for pattern in WEIGHT_PATTERNS:                       # a rebuilt folder must not keep another layout's files
        for stale in out.glob(pattern):
            stale.unlink()
    ext, base = {"safetensors": ("safetensors", "model"), "bin": ("bin", "pytorch_model")}[fmt]
    names = list(weights)
    if shards <= 1:
        groups = [names]
        files = [f"{base}.{ext}"]
    else:
        total = sum(t.numel() for t in weights.values())
        groups = [[] for _ in range(shards)]
        seen = 0
        for name in names:                                # contiguous, roughly equal-sized shards
            groups[min(shards - 1, seen * shards // total)].append(name)
            seen += weights[name].numel()
        files = [f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for group, file in zip(groups, files):
        part = {n: weights[n].contiguous() for n in group}
        if fmt == "safetensors":
            save_file(part, str(out / file), metadata={"format": "pt"})
        else:
            torch.save(part, out / file)
        (out / file).chmod(0o644)                         # safetensors writes 0600; the server may run as another user
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
                 "weight_map": {n: f for group, f in zip(groups, files) for n in group}}
        (out / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def build_checkpoint(out_dir, *, seed=0, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, tie_word_embeddings=False, vision_hidden=32, vision_layers=3,
                     vision_heads=2, vision_intermediate=64, image_size=56, patch_size=14, shards=1,
                     fmt="safetensors", include_dropped_layer=True, std=None, dtype=torch.float32,
                     max_position_embeddings=2048, vocab_size=None, tokenizer_model_max_length=None,
                     so400m_tower=False) -> Path:
    """Build the checkpoint folder and return its path. `std`, when given, replaces every weight matrix's scale.
    `vocab_size` pads the embedding and LM head past the tokenizer (as Qwen's 151936 does);
    `tokenizer_model_max_length` goes into config.json as Bunny's training context does. `so400m_tower` leaves
    `vision_config` out of config.json, as the published checkpoint does, so the tower is SigLIP-so400m-patch14-384
    (the vision_* arguments are then ignored; about 430M weights)."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', not {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_size, eos_id = write_tokenizer(out)
    if vocab_size is not None and vocab_size < tokenizer_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_size}")
    vocab_size = vocab_size or tokenizer_size
    cfg = {
        "architectures": ["BunnyQwenForCausalLM"], "model_type": "bunny-qwen",
        "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "num_hidden_layers": num_layers,
        "vocab_size": vocab_size, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
        "bos_token_id": None, "eos_token_id": eos_id,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "image_aspect_ratio": "pad",
    }
    if so400m_tower:
        vision = {f.name: getattr(VisionConfig(), f.name) for f in dataclasses.fields(VisionConfig)}
    else:
        vision = {
            "hidden_size": vision_hidden, "intermediate_size": vision_intermediate,
            "num_hidden_layers": vision_layers, "num_attention_heads": vision_heads, "image_size": image_size,
            "patch_size": patch_size, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "num_channels": 3,
        }
        cfg["vision_config"] = vision
    cfg["mm_hidden_size"] = vision["hidden_size"]
    if tokenizer_model_max_length is not None:
        cfg["tokenizer_model_max_length"] = tokenizer_model_max_length
    weights = make_weights(cfg, vision, seed=seed, std=std, include_dropped_layer=include_dropped_layer)
    write_weights(out, {n: t.to(dtype) for n, t in weights.items()}, shards, fmt)
    # config.json last: a folder with one is complete (build.sh tests for it)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a random-weight Bunny checkpoint for demos and tests.")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", dest="fmt", choices=["safetensors", "bin"], default="safetensors")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = ap.parse_args(argv)
    out = build_checkpoint(args.out, seed=args.seed, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                           intermediate_size=512, vision_hidden=64, vision_layers=3, vision_heads=4,
                           vision_intermediate=128, image_size=112, patch_size=14, shards=args.shards,
                           fmt=args.fmt, dtype=getattr(torch, args.dtype), max_position_embeddings=4096)
    print(f"wrote a demo checkpoint to {out}")


if __name__ == "__main__":
    main()
