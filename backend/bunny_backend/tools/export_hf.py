"""Export a Bunny checkpoint as Hugging Face folders that other servers load: Qwen2 (text) and LLaVA (images).

- `export_qwen2(src, out)`: a `Qwen2ForCausalLM` folder holding the language model alone (Bunny's LLM weights
  carry Qwen2's names already).
- `export_llava(src, out)`: a `LlavaForConditionalGeneration` folder: the SigLIP tower as `vision_tower`, Bunny's
  projector (Linear, GELU, Linear) as `multi_modal_projector`, `vision_feature_layer` -2 with the `full` feature
  selection (Bunny drops SigLIP's last layer and keeps every patch), and an `<image>` token added after the
  tokenizer's vocabulary.

Both carry a chat template that renders Bunny's prompt and conversations (docs/api/triton-model.md), and the
LLaVA folder a SigLIP image processor with Bunny's resize and normalisation (equal to ours for square images).
The benchmark uses them to run vLLM on the same weights (bench/peer/).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from bunny_backend.io.conversation import IMAGE_TOKEN, ROLE_NAMES, SEP, SEP2, SYSTEM_PROMPT
from bunny_backend.io.tokenizer import EOS_TOKEN, eos_token_ids, load_tokenizer
from bunny_backend.model.config import BunnyConfig
from bunny_backend.model.loader import checkpoint_files, iter_tensors

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
# Bunny's conversation template (io/conversation.py) in Jinja: string contents, or OpenAI-style parts with the
# images first (one `<image>\n` each, as build_prompt places images without placeholders); a system message
# replaces the default system text.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + SYSTEM_PROMPT.replace("'", "\\'") + "') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endfor -%}"
    "{{ ns.system }}{{ '" + SEP + "' }}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ '" + ROLE_NAMES["user"] + ": ' if m['role'] == 'user' else '" + ROLE_NAMES["assistant"] + ": ' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}"
    "{%- for p in m['content'] if p['type'] in ('image', 'image_url') -%}{{ '" + IMAGE_TOKEN + "\\n' }}{%- endfor -%}"
    "{%- for p in m['content'] if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '" + SEP + "' if m['role'] == 'user' else '" + SEP2 + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ROLE_NAMES["assistant"] + ":' }}{%- endif -%}"
)


def _bunny_config(src: Path) -> tuple[dict, BunnyConfig]:
    raw = json.loads((src / "config.json").read_text())
    return raw, BunnyConfig.from_dict(raw)


def _dtype_name(raw: dict) -> str:
    return str(raw.get("torch_dtype", "float32")).removeprefix("torch.")


def qwen2_config(raw: dict, cfg: BunnyConfig, eos_id: int) -> dict:
    t = cfg.text
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "num_hidden_layers": t.num_hidden_layers,
            "vocab_size": t.vocab_size, "rope_theta": t.rope_theta, "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
            "hidden_act": "silu", "use_sliding_window": False, "attention_dropout": 0.0,
            "torch_dtype": _dtype_name(raw), "dtype": _dtype_name(raw), "bos_token_id": eos_id,
            "eos_token_id": eos_id}


def siglip_config(cfg: BunnyConfig, raw: dict) -> dict:
    v = cfg.vision
    return {"model_type": "siglip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
            "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
            "torch_dtype": _dtype_name(raw)}


def _write_tokenizer(src: Path, out: Path, eos_id: int, extra_tokens: list[str]) -> None:
    """The source tokenizer files plus tokenizer_config.json with the chat template (and any added tokens)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    decoder = dict(tok_cfg.get("added_tokens_decoder", {}))
    if extra_tokens:
        from tokenizers import AddedToken, Tokenizer
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_tokens])
        tok.save(str(out / "tokenizer.json"))
        for t in extra_tokens:
            decoder[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
    tok_cfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder,
                    "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "bos_token": None,
                    "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False})
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id, "bos_token_id": eos_id}))


def _save(weights: dict[str, torch.Tensor], out: Path) -> None:
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})


def export_qwen2(src: str | Path, out: str | Path) -> Path:
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw, cfg = _bunny_config(src)
    eos_id = eos_token_ids(src, load_tokenizer(src))[0]
    weights = {name: t.read() for name, t in iter_tensors(checkpoint_files(src))
               if name.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))}
    _save(weights, out)
    _write_tokenizer(src, out, eos_id, [])
    (out / "config.json").write_text(json.dumps(qwen2_config(raw, cfg, eos_id), indent=2))
    return out


def export_llava(src: str | Path, out: str | Path) -> Path:
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw, cfg = _bunny_config(src)
    tokenizer = load_tokenizer(src)
    eos_id = eos_token_ids(src, tokenizer)[0]
    image_token_id = len(tokenizer)               # right after the tokenizer's last token
    if image_token_id >= cfg.text.vocab_size:
        raise ValueError(f"no room for an {IMAGE_TOKEN} token: the tokenizer has {image_token_id} tokens and the "
                         f"embedding {cfg.text.vocab_size} rows")
    weights: dict[str, torch.Tensor] = {}
    for name, stored in iter_tensors(checkpoint_files(src)):
        if not name.startswith(("model.", "lm_head.")):
            continue
        t = stored.read()
        if name.startswith(VISION_PREFIX):
            weights["model.vision_tower.vision_model." + name[len(VISION_PREFIX):]] = t
        elif name.startswith(tuple(PROJECTOR)):
            prefix = next(p for p in PROJECTOR if name.startswith(p))
            weights["model.multi_modal_projector." + PROJECTOR[prefix] + name[len(prefix):]] = t
        elif name.startswith("model."):
            weights["model.language_model." + name[len("model."):]] = t
        elif name.startswith("lm_head."):
            weights[name] = t
    _fill_unused_vision_weights(weights, cfg)
    _save(weights, out)
    _write_tokenizer(src, out, eos_id, [IMAGE_TOKEN])
    v = cfg.vision
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": True, "size": {"height": v.image_size, "width": v.image_size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}, indent=2))
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaProcessor", "patch_size": v.patch_size, "vision_feature_select_strategy": "full",
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 0}, indent=2))
    text = qwen2_config(raw, cfg, eos_id)
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "image_token_index": image_token_id, "image_token_id": image_token_id,
              "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
              "vision_feature_layer": -2, "vision_feature_select_strategy": "full",
              "image_seq_length": cfg.num_image_tokens, "tie_word_embeddings": cfg.text.tie_word_embeddings,
              "text_config": {k: v for k, v in text.items() if k != "architectures"},
              "vision_config": siglip_config(cfg, raw), "torch_dtype": text["torch_dtype"], "dtype": text["dtype"],
              "eos_token_id": eos_id}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _fill_unused_vision_weights(weights: dict[str, torch.Tensor], cfg: BunnyConfig) -> None:
    """SigLIP's last encoder layer and post_layernorm, which Bunny drops, are optional in its checkpoints; a LLaVA
    folder needs them to load cleanly. Zero weights stand in (feature layer -2 never reads them)."""
    v = cfg.vision
    prefix = "model.vision_tower.vision_model."
    like = weights[f"{prefix}embeddings.patch_embedding.bias"]
    last = f"{prefix}encoder.layers.{v.num_hidden_layers - 1}."
    shapes = {"layer_norm1.weight": [v.hidden_size], "layer_norm1.bias": [v.hidden_size],
              "layer_norm2.weight": [v.hidden_size], "layer_norm2.bias": [v.hidden_size],
              "mlp.fc1.weight": [v.intermediate_size, v.hidden_size], "mlp.fc1.bias": [v.intermediate_size],
              "mlp.fc2.weight": [v.hidden_size, v.intermediate_size], "mlp.fc2.bias": [v.hidden_size]}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes[f"self_attn.{proj}.weight"] = [v.hidden_size, v.hidden_size]
        shapes[f"self_attn.{proj}.bias"] = [v.hidden_size]
    wanted = {last + k: s for k, s in shapes.items()}
    wanted.update({f"{prefix}post_layernorm.weight": [v.hidden_size], f"{prefix}post_layernorm.bias": [v.hidden_size]})
    for name, shape in wanted.items():
        if name not in weights:
            weights[name] = like.new_zeros(shape)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", help="Bunny checkpoint folder")
    ap.add_argument("--qwen2", help="write the Qwen2 (text) folder here")
    ap.add_argument("--llava", help="write the LLaVA folder here")
    args = ap.parse_args(argv)
    if args.qwen2:
        print(f"wrote {export_qwen2(args.src, args.qwen2)}")
    if args.llava:
        print(f"wrote {export_llava(args.src, args.llava)}")


if __name__ == "__main__":
    main()
