"""The real Qwen vocabulary for the peer benchmark, without downloading a model.

The `qwen-agent` wheel ships Qwen's BPE ranks (`qwen_agent/utils/qwen.tiktoken`, 151643 tokens). pip fetches the
wheel alone (no dependencies) into a scratch folder under models/bench/, and transformers' TikTokenConverter turns
the ranks into a tokenizer.json with Qwen2's pre-tokenizer (digits split one by one) and the three special tokens
at 151643-151645. Check: "Hello, world!" -> [9707, 11, 1879, 0].
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from bench.models import CACHE_DIR
from bunny_backend.tools.demo_checkpoint import QWEN2_SPLIT, SPECIAL_TOKENS

QWEN_AGENT = "qwen-agent==0.0.34"
RANKS_IN_WHEEL = "qwen_agent/utils/qwen.tiktoken"
CHECK = ("Hello, world!", [9707, 11, 1879, 0])


def ranks_file(scratch: Path = CACHE_DIR / "qwen-agent") -> Path:
    out = scratch / "qwen.tiktoken"
    if out.is_file():
        return out
    scratch.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(scratch), QWEN_AGENT],
                         capture_output=True, text=True)
    if got.returncode:
        raise RuntimeError(f"pip could not fetch {QWEN_AGENT} (for Qwen's vocabulary):\n{got.stderr[-2000:]}")
    wheel = next(scratch.glob("qwen_agent-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        out.write_bytes(z.read(RANKS_IN_WHEEL))
    return out


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_qwen_tokenizer(out: Path) -> int:
    """tokenizer.json and tokenizer_config.json of the Qwen vocabulary in `out`; returns the EOS id."""
    from tokenizers import AddedToken, Tokenizer, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = ranks_file()

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_url):   # the file is plain "base64 rank" lines; no tiktoken package needed
            return read_ranks(path)

    tok: Tokenizer = _Converter(vocab_file=str(path), pattern=QWEN2_SPLIT).converted()
    tok.normalizer = normalizers.NFC()
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(base, base + len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens landed at {ids}, expected {base}..")
    got = tok.encode(CHECK[0], add_special_tokens=False).ids
    if got != CHECK[1]:
        raise RuntimeError(f"the converted Qwen tokenizer gives {got} for {CHECK[0]!r}, expected {CHECK[1]}")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for t, i in zip(SPECIAL_TOKENS, ids)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder,
        "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None, "eos_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[0], "unk_token": None, "clean_up_tokenization_spaces": False,
        "model_max_length": 32768, "errors": "replace"}, indent=2))
    for stale in ("vocab.json", "merges.txt"):
        (out / stale).unlink(missing_ok=True)
    return ids[0]
