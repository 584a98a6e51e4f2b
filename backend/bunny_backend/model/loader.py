"""Load a published Bunny checkpoint (safetensors, sharded or not, or pytorch_model*.bin) onto our modules.

The model is built on the meta device and materialised once on the target device; tensors are then copied in
one at a time from memory-mapped files, so the weights are never held twice. A tensor-parallel rank reads only its
slice of each sharded tensor (safetensors' `get_slice`; a narrowed view of a memory-mapped .bin), so its peak
memory is about its share of the model (model/sharding.py).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from bunny_backend.model.bunny import VISION_PREFIXES, BunnyForCausalLM
from bunny_backend.model.config import BunnyConfig
from bunny_backend.model.sharding import Shard
from bunny_backend.utils.distributed import SINGLE, TensorParallel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_VISION = "model.vision_tower.vision_tower.vision_model."
_ROTARY_BUFFER = re.compile(r".*rotary_emb\.inv_freq$")
_FUSED = ("qkv_proj", "gate_up_proj")


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


class StoredTensor:
    """A checkpoint tensor not read yet: its shape, and the whole of it or one slice on demand."""

    def __init__(self, shape, read_slice):
        self.shape, self._read_slice = tuple(shape), read_slice

    def read(self, shard: Shard | None = None) -> torch.Tensor:
        index = (slice(None),) * len(self.shape)
        if shard is not None:
            index = index[:shard.dim] + (slice(shard.start, shard.start + shard.length),) + index[shard.dim + 1:]
        return self._read_slice(index)


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, StoredTensor]]:
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    stored = f.get_slice(name)
                    yield name, StoredTensor(stored.get_shape(), stored.__getitem__)
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            for name, tensor in state.items():
                yield name, StoredTensor(tensor.shape, tensor.__getitem__)
            del state


def is_ignored(name: str, cfg: BunnyConfig, has_vision: bool = True) -> bool:
    """Weights a Bunny checkpoint may carry that the model (or this tensor-parallel rank) does not use."""
    if _ROTARY_BUFFER.match(name):
        return True
    if not has_vision and name.startswith(VISION_PREFIXES):
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


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _target(params: dict[str, torch.nn.Parameter], modules: dict, name: str):
    """Map a checkpoint name to (parameter, Shard or None): a module's `checkpoint_shards` say which slice of the
    tensor this rank holds and where it lands (fused q/k/v and gate/up land in a part of one parameter)."""
    module_name, _, leaf = name.rpartition(".")
    parent_name, _, proj = module_name.rpartition(".")
    for candidate in (module_name, *(_join(parent_name, fused) for fused in _FUSED)):
        shards = getattr(modules.get(candidate), "checkpoint_shards", {})
        if proj in shards:
            return getattr(modules[candidate], leaf), shards[proj]
    return params.get(name), None


def _read(name: str, stored: StoredTensor, shard: Shard | None) -> torch.Tensor:
    if shard is not None and (len(stored.shape) <= shard.dim or stored.shape[shard.dim] != shard.total):
        raise CheckpointError(f"{name}: checkpoint shape {stored.shape} has not {shard.total} along dimension "
                              f"{shard.dim}, as config.json implies")
    return stored.read(shard)


def _zero_padding(modules: dict) -> None:
    """Rows no checkpoint tensor fills (the vocabulary padding of the last rank) must not hold garbage."""
    for module in modules.values():
        shards = getattr(module, "checkpoint_shards", None)
        if shards:
            dim = next(iter(shards.values())).dim
            if sum(s.length for s in shards.values()) < module.weight.shape[dim]:
                module.weight.data.zero_()


def load_model(model_path: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", tp: TensorParallel = SINGLE) -> BunnyForCausalLM:
    """The model, or tensor-parallel rank `tp.rank`'s part of it (ValueError if the sizes do not shard)."""
    model_path = Path(model_path)
    cfg = BunnyConfig.from_pretrained(model_path)
    files = checkpoint_files(model_path)
    with torch.device("meta"):
        model = BunnyForCausalLM(cfg, tp)
        model = model.to(dtype)
    model = model.to_empty(device=device)
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected = set(expected_checkpoint_names(params, modules))
    seen, unexpected = set(), []
    with torch.no_grad():
        _zero_padding(modules)
        for name, stored in iter_tensors(files):
            if is_ignored(name, cfg, model.has_vision):
                continue
            param, shard = _target(params, modules, name)
            if param is None:
                unexpected.append(name)
                continue
            tensor = _read(name, stored, shard)
            dest = param if shard is None else param.narrow(shard.dim, shard.offset, shard.length)
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
        shards = getattr(modules[module_name], "checkpoint_shards", None)
        if shards:
            parent = module_name.rpartition(".")[0]
            names += [_join(parent, proj, leaf) for proj in shards]
        else:
            names.append(pname)
    return names
