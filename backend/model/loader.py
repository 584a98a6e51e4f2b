"""Load a published Bunny checkpoint (safetensors, sharded or not, or pytorch_model*.bin) onto our modules.

The model is built on the meta device and materialised once on the target device; tensors are then copied in
one at a time from memory-mapped files, so the weights are never held twice.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from bunny_backend.model.bunny import BunnyForCausalLM
from bunny_backend.model.config import BunnyConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_VISION = "model.vision_tower.vision_tower.vision_model."
_ROTARY_BUFFER = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    pass


def checkpoint_files(model_path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (model_path / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
            return [model_path / s for s in shards]
    for pattern in ("model.safetensors", "pytorch_model.bin"):
        if (model_path / pattern).is_file():
            return [model_path / pattern]
    found = sorted(model_path.glob("*.safetensors")) or sorted(model_path.glob("pytorch_model*.bin"))
    if not found:
        raise CheckpointError(f"no model.safetensors or pytorch_model*.bin in {model_path}")
    return found


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            yield from state.items()
            del state


def is_ignored(name: str, cfg: BunnyConfig) -> bool:
    """Weights a Bunny checkpoint may carry that the model does not use."""
    if _ROTARY_BUFFER.match(name):
        return True
    if name.startswith(_VISION):
        rest = name[len(_VISION):]
        if rest.startswith(("post_layernorm.", "head.")):
            return True
        m = re.match(r"encoder\.layers\.(\d+)\.", rest)
        if m and int(m.group(1)) >= cfg.vision.num_used_layers:
            return True
    if name == "lm_head.weight" and cfg.text.tie_word_embeddings:
        return True
    return False


def _target(params: dict[str, torch.nn.Parameter], modules: dict, name: str):
    """Map a checkpoint name to (parameter, row offset, rows) — fused q/k/v and gate/up land in a slice."""
    if name in params:
        return params[name], None
    module_name, _, leaf = name.rpartition(".")
    parent_name, _, proj = module_name.rpartition(".")
    for fused in ("qkv_proj", "gate_up_proj"):
        module = modules.get(f"{parent_name}.{fused}")
        if module is not None and proj in getattr(module, "packed_shards", {}):
            return getattr(module, leaf), module.packed_shards[proj]
    return None, None


def load_model(model_path: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> BunnyForCausalLM:
    model_path = Path(model_path)
    cfg = BunnyConfig.from_pretrained(model_path)
    files = checkpoint_files(model_path)
    with torch.device("meta"):
        model = BunnyForCausalLM(cfg)
        model = model.to(dtype)
    model = model.to_empty(device=device)
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected = set(expected_checkpoint_names(params, modules))
    seen, unexpected = set(), []
    with torch.no_grad():
        for name, tensor in iter_tensors(files):
            if is_ignored(name, cfg):
                continue
            param, shard = _target(params, modules, name)
            if param is None:
                unexpected.append(name)
                continue
            dest = param if shard is None else param.narrow(0, shard[0], shard[1])
            if dest.shape != tensor.shape:
                raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dest.shape)}")
            dest.copy_(tensor)
            seen.add(name)
    if unexpected:
        raise CheckpointError(f"{model_path}: unexpected tensors in checkpoint: {sorted(unexpected)[:20]}")
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(f"{model_path}: checkpoint is missing tensors: {missing[:20]}")
    return model.eval()


def expected_checkpoint_names(params: dict, modules: dict) -> list[str]:
    """Every checkpoint name the model needs: fused parameters are expanded to their q/k/v, gate/up names."""
    names = []
    for pname in params:
        module_name, _, leaf = pname.rpartition(".")
        shards = getattr(modules[module_name], "packed_shards", None)
        if shards:
            parent = module_name.rpartition(".")[0]
            names += [f"{parent}.{proj}.{leaf}" for proj in shards]
        else:
            names.append(pname)
    return names
