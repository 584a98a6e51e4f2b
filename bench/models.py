"""The benchmark's model shapes, their random-weight checkpoints, and the bytes one decode step must read.

`build_checkpoint` sizes the vocabulary from the demo tokenizer (~1.5k tokens); real Qwen checkpoints carry a
padded vocabulary (151936 rows for 151646 tokens), so `pad_vocab` appends rows to embed_tokens and lm_head and
rewrites config.json's vocab_size. The appended lm_head rows are zero: their logit is 0, below the best real
token's, so greedy decoding never picks an id the tokenizer cannot decode — while the matmul still streams them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / "models" / "bench"          # models/ is git-ignored


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    dtype: str                       # float32 | bfloat16
    tie_word_embeddings: bool = False
    tokenizer: str = "demo"          # demo: the demo BPE (1536 tokens); qwen: Qwen's real vocabulary (bench/peer)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def key(self) -> str:
        return f"{self.name}-v{self.vocab_size}-{self.dtype}"


# CPU-sized: Qwen1.5's layout (MHA, untied, biased qkv) at ~1/15 of the 2B's decoder; SigLIP at 224/16 -> 196 tokens.
CPU = ModelSpec("cpu", hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=16, intermediate_size=2816,
                vocab_size=32000, vision_hidden=256, vision_layers=4, vision_heads=4, vision_intermediate=1024,
                image_size=224, patch_size=16, dtype="float32")
# Bunny-v1_0-2B-zh: Qwen1.5-1.8B + SigLIP-so400m-patch14-384 (729 image tokens), bf16.
BUNNY_2B = ModelSpec("2b", hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=5504,
                     vocab_size=151936, vision_hidden=1152, vision_layers=27, vision_heads=16,
                     vision_intermediate=4304, image_size=384, patch_size=14, dtype="bfloat16")
# The cpu model with a ViT-B-sized tower (12 layers, 768 wide): for the same-image scenario (bench/scenarios.py).
CPU_VITB = replace(CPU, name="cpu-vitb", vision_hidden=768, vision_layers=12, vision_heads=12,
                   vision_intermediate=3072)
# The peer comparison's model (issue #16): the cpu shape with Qwen's real vocabulary (151646 tokens, embedding and
# lm_head padded to 151936), so vLLM and we tokenize and stream the same ids; lm_head makes it 1.03 GB per step.
QWEN_VOCAB = replace(CPU, name="qwen", vocab_size=151936, tokenizer="qwen")
QWEN_TOKENS = 151646
SPECS = {"cpu": CPU, "2b": BUNNY_2B, "cpu-vitb": CPU_VITB, "qwen": QWEN_VOCAB}


def ensure_checkpoint(spec: ModelSpec, cache_dir: Path = CACHE_DIR, log=print) -> Path:
    """The checkpoint folder for `spec`, built (once) under cache_dir; config.json is written last."""
    out = cache_dir / spec.key()
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()).get("bench_spec") == asdict(spec):
        return out
    from bunny_backend.tools.demo_checkpoint import build_checkpoint
    log(f"building the random-weight checkpoint {out} ...")
    build_checkpoint(out, seed=0, hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
                     num_kv_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size,
                     tie_word_embeddings=spec.tie_word_embeddings, vision_hidden=spec.vision_hidden,
                     vision_layers=spec.vision_layers, vision_heads=spec.vision_heads,
                     vision_intermediate=spec.vision_intermediate, image_size=spec.image_size,
                     patch_size=spec.patch_size, dtype=spec.torch_dtype, max_position_embeddings=4096,
                     vocab_size=QWEN_TOKENS if spec.tokenizer == "qwen" else None)
    pad_vocab(out, spec.vocab_size)
    cfg = json.loads((out / "config.json").read_text())
    if spec.tokenizer == "qwen":
        from bench.peer.qwen_vocab import write_qwen_tokenizer
        cfg["eos_token_id"] = write_qwen_tokenizer(out)
    cfg["bench_spec"] = asdict(spec)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def pad_vocab(path: Path, vocab_size: int) -> None:
    """Grow embed_tokens (random rows) and lm_head (zero rows) to vocab_size; no-op if already that big."""
    from safetensors.torch import load_file, save_file
    cfg = json.loads((path / "config.json").read_text())
    have = cfg["vocab_size"]
    if have >= vocab_size:
        return
    file = path / "model.safetensors"
    weights = load_file(str(file))
    gen = torch.Generator().manual_seed(1)
    emb = weights["model.embed_tokens.weight"]
    extra = torch.randn(vocab_size - have, emb.shape[1], generator=gen) * emb.float().std()
    weights["model.embed_tokens.weight"] = torch.cat([emb, extra.to(emb.dtype)])
    if "lm_head.weight" in weights:
        head = weights["lm_head.weight"]
        weights["lm_head.weight"] = torch.cat([head, head.new_zeros(vocab_size - have, head.shape[1])])
    save_file(weights, str(file), metadata={"format": "pt"})
    file.chmod(0o644)
    cfg["vocab_size"] = vocab_size
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def parameter_counts(spec: ModelSpec) -> dict[str, int]:
    """Parameters by part, from the shapes (Qwen2: biased q/k/v, unbiased o and MLP, RMSNorm weights)."""
    h, inter, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    kv = spec.num_kv_heads * (h // spec.num_heads)
    layer = (h * h + h) + 2 * (kv * h + kv) + h * h + 3 * h * inter + 2 * h
    vh, vi = spec.vision_hidden, spec.vision_intermediate
    vlayer = 4 * (vh * vh + vh) + 2 * vh * vi + vi + vh + 4 * vh
    vision = (3 * spec.patch_size ** 2 * vh + vh) + spec.num_image_tokens * vh + (spec.vision_layers - 1) * vlayer
    return {"decoder_layers": spec.num_layers * layer, "final_norm": h, "embed_tokens": v * h,
            "lm_head": 0 if spec.tie_word_embeddings else v * h, "vision_tower": vision,
            "projector": spec.vision_hidden * h + h + h * h + h}


def decode_weight_bytes(spec: ModelSpec, batch: int = 1) -> int:
    """Weight bytes one decode step reads: every decoder layer, the final norm and lm_head are streamed whole;
    the embedding table is gathered, one row per sequence (a tied lm_head streams the table once as lm_head)."""
    c = parameter_counts(spec)
    elem = torch.empty((), dtype=spec.torch_dtype).element_size()
    head = c["lm_head"] or c["embed_tokens"]
    return elem * (c["decoder_layers"] + c["final_norm"] + head + batch * spec.hidden_size)


def kv_bytes_per_token(spec: ModelSpec) -> int:
    elem = torch.empty((), dtype=spec.torch_dtype).element_size()
    return 2 * spec.num_layers * spec.num_kv_heads * (spec.hidden_size // spec.num_heads) * elem


def describe(spec: ModelSpec) -> dict:
    c = parameter_counts(spec)
    return {**asdict(spec), "params": c, "params_llm_total": c["decoder_layers"] + c["final_norm"] + c["embed_tokens"]
            + c["lm_head"], "params_total": sum(c.values()), "decode_weight_bytes_batch1": decode_weight_bytes(spec),
            "kv_bytes_per_token": kv_bytes_per_token(spec), "num_image_tokens": spec.num_image_tokens}
