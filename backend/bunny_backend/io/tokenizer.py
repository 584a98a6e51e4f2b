"""Load a checkpoint's tokenizer offline, and decide which token ids end generation."""
from __future__ import annotations

import json
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(model_path: str | Path):
    """A transformers fast tokenizer from `tokenizer.json`, or else from `vocab.json` + `merges.txt` (Qwen2's rules)."""
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} is not a folder")
    has_json = (path / "tokenizer.json").is_file()
    has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not (has_json or has_bpe):
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json, or vocab.json and merges.txt")
    # Chosen by hand rather than AutoTokenizer: config.json's model_type "bunny-qwen" is unknown to transformers.
    if has_json:
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    else:
        from transformers import Qwen2Tokenizer
        tokenizer = Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token is None and EOS_TOKEN in tokenizer.get_vocab():
        tokenizer.eos_token = EOS_TOKEN
    return tokenizer


def eos_token_ids(model_path: str | Path, tokenizer) -> tuple[int, ...]:
    """The ids generation stops at, from the checkpoint: `generation_config.json`'s `eos_token_id` (an int or a
    list) when it has one, else `config.json`'s, else the tokenizer's EOS (`<|endoftext|>` where its vocabulary
    has it). The engine and the reference both stop here."""
    for name in ("generation_config.json", "config.json"):
        file = Path(model_path) / name
        value = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
        ids = [value] if isinstance(value, int) else value
        if ids:
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"{file}: eos_token_id must be a token id or a list of them, got {value!r}")
            return tuple(dict.fromkeys(ids))
    return (tokenizer_eos_id(tokenizer),)


def tokenizer_eos_id(tokenizer) -> int:
    """`<|endoftext|>`'s id where the vocabulary has it, else the tokenizer's declared EOS."""
    vocab = tokenizer.get_vocab()
    if EOS_TOKEN in vocab:
        return vocab[EOS_TOKEN]
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(f"the tokenizer has neither {EOS_TOKEN} nor an eos_token")
