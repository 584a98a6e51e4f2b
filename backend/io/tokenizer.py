"""Load a checkpoint's tokenizer offline and find its end-of-text id."""
from __future__ import annotations

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


def eos_token_id(tokenizer) -> int:
    """`<|endoftext|>`'s id where the vocabulary has it, else the tokenizer's declared EOS."""
    vocab = tokenizer.get_vocab()
    if EOS_TOKEN in vocab:
        return vocab[EOS_TOKEN]
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(f"the tokenizer has neither {EOS_TOKEN} nor an eos_token")
