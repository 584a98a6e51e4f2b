"""Structured output: a request's `response_format` -> a grammar compiled by xgrammar, one matcher per sequence, and
the token mask the sampler applies to the rows that carry one (docs/api/triton-model.md, "response_format").

Grammars are compiled on the submitting thread (LLMEngine.add_request), once per distinct response_format: a bounded
LRU cache keyed by its canonical JSON. The engine thread only fills bitmasks and advances matchers. A sequence's
matcher has accepted exactly its generated tokens: preemption and quarantine keep those tokens (the recompute
prefill samples the next one), a failed step appends none, and a finished or cancelled sequence takes its matcher
with it.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict

import torch

from bunny_backend.engine.outputs import BadRequestError

KINDS = ("text", "json_object", "json_schema", "regex", "choice")
MAX_CACHED_GRAMMARS = 64
# xgrammar prefixes its messages with "[time] file.cc:line: " and sometimes a failed check's condition
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def parse_response_format(text: str | None) -> dict | None:
    """The response_format JSON -> its canonical form (only the fields that shape the grammar), or None for free
    text. BadRequestError naming the problem."""
    if text is None:
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequestError(f"response_format is not valid JSON: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise BadRequestError('response_format must be a JSON object with a string "type"')
    kind = spec["type"]
    if kind not in KINDS:
        raise BadRequestError(f"response_format type {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": kind}
    if kind == "json_schema":
        inner = spec.get("json_schema")
        if not isinstance(inner, dict):
            raise BadRequestError('response_format of type json_schema needs a "json_schema" object')
        if not isinstance(inner.get("schema"), dict):
            raise BadRequestError('response_format.json_schema needs a "schema" object (the JSON Schema)')
        for name, want in (("name", str), ("strict", bool)):
            if inner.get(name) is not None and not isinstance(inner[name], want):
                raise BadRequestError(f"response_format.json_schema.{name} must be a {want.__name__}")
        return {"type": kind, "schema": inner["schema"]}
    if kind == "regex":
        if not isinstance(spec.get("regex"), str) or not spec["regex"]:
            raise BadRequestError('response_format of type regex needs a non-empty string "regex"')
        return {"type": kind, "regex": spec["regex"]}
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise BadRequestError('response_format of type choice needs "choices": a non-empty list of non-empty strings')
    return {"type": kind, "choices": choices}


_DATA_KEYS = {"enum", "const", "default", "examples"}   # values, not schemas
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}   # name -> schema


def _bounded_strings_as_patterns(node):
    """The schema with each length-bounded string's bounds as an equal pattern ("^.{min,max}$"). xgrammar 0.2.9
    lowers minLength/maxLength to a character class that admits raw control characters, which is invalid JSON
    (mlc-ai/xgrammar#800); its patterns go through a JSON-string-aware regex that does not."""
    if isinstance(node, list):
        return [_bounded_strings_as_patterns(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _bounded_strings_as_patterns(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _DATA_KEYS else _bounded_strings_as_patterns(value)
    low, high = out.get("minLength", 0), out.get("maxLength")
    if (out.get("type") == "string" and not {"pattern", "format"} & out.keys()
            and ("minLength" in out or "maxLength" in out)
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in (low, high or 0))):
        out.pop("minLength", None), out.pop("maxLength", None)
        out["pattern"] = f"^.{{{low},{'' if high is None else high}}}$"
    return out


def _ebnf_literal(text: str) -> str:
    """A string literal of xgrammar's EBNF: quotes, backslashes and unprintable characters as \\UXXXXXXXX."""
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in text) + '"'


class GrammarCompiler:
    """Compiles response_formats for one engine's tokenizer and vocabulary, each distinct one once (thread-safe).

    vocab_size is the model's (the LM head's rows), which may exceed the tokenizer's: the rows past it are never
    allowed. stop_token_ids are the engine's EOS ids: where a grammar may end, they are what it allows."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, max_cached: int = MAX_CACHED_GRAMMARS):
        self._tokenizer, self.vocab_size, self._stop = tokenizer, vocab_size, sorted(stop_token_ids)
        self._max_cached = max_cached
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None

    def _xgrammar(self):
        """xgrammar's compiler over our TokenizerInfo, built at the first grammar request (under the lock)."""
        if self._compiler is None:
            import xgrammar
            info = xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self._stop)
            # Our own cache below; xgrammar's would keep a second copy of each grammar.
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                      cache_enabled=False)
        return self._compiler

    def matcher(self, response_format: str | None) -> "SequenceGrammar | None":
        """A fresh matcher for one sequence, or None for free text. BadRequestError naming the problem."""
        spec = parse_response_format(response_format)
        if spec is None:
            return None
        key = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            compiler = self._xgrammar()
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
        if compiled is None:
            compiled = self._compile(compiler, spec)
            with self._lock:
                self._compiled[key] = compiled
                while len(self._compiled) > self._max_cached:
                    self._compiled.popitem(last=False)
        import xgrammar
        return SequenceGrammar(xgrammar.GrammarMatcher(compiled, override_stop_tokens=self._stop))

    @staticmethod
    def _compile(compiler, spec: dict):
        import xgrammar
        kind = spec["type"]
        try:
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "json_schema":
                schema = _bounded_strings_as_patterns(spec["schema"])
                return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(spec["regex"])
            ebnf = "root ::= " + " | ".join(_ebnf_literal(c) for c in spec["choices"])
            return compiler.compile_grammar(xgrammar.Grammar.from_ebnf(ebnf))
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json_schema": "the JSON schema", "regex": "the regex"}.get(kind, "the grammar")
            reason = _XGRAMMAR_PREFIX.sub("", " ".join(str(e).split()))
            raise BadRequestError(f"response_format: {what} cannot be compiled: {reason}") from None


class SequenceGrammar:
    """One sequence's place in its grammar: the tokens it may take next, and whether the grammar has ended."""

    def __init__(self, matcher):
        self._matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance over a sampled token; False if the grammar does not allow it."""
        return self._matcher.accept_token(token)

    @property
    def ended(self) -> bool:
        """The grammar accepted one of its stop tokens: the sequence is complete."""
        return self._matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


class TokenMask:
    """The allowed next tokens of the rows of a batch that have a grammar; the other rows are left alone.

    bitmask [len(rows), ceil(V / 32)] int32, xgrammar's layout: bit j of word w allows token 32 * w + j."""

    def __init__(self, rows: list[int], bitmask: torch.Tensor):
        self.rows, self.bitmask = rows, bitmask

    @staticmethod
    def for_batch(grammars: list[SequenceGrammar | None], vocab_size: int) -> "TokenMask | None":
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        bitmask = torch.zeros((len(rows), -(-vocab_size // 32)), dtype=torch.int32)
        for k, i in enumerate(rows):
            grammars[i].fill_bitmask(bitmask, k)
        return TokenMask(rows, bitmask)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> a copy whose masked rows have -inf where their grammar forbids the token."""
        device, vocab = logits.device, logits.shape[-1]
        words = self.bitmask.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((words[:, :, None] >> shifts) & 1).reshape(len(self.rows), -1)[:, :vocab].bool()
        index = torch.tensor(self.rows, device=device)
        return logits.index_copy(0, index, logits[index].masked_fill(~allowed, float("-inf")))
