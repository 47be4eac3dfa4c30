"""Constrained decoding: JSON schemas, strict tool calls and the thinking budget, with llguidance.

Why llguidance (measured on the 248,320-token vocabulary, docs/structured-output.md): a token mask and a
schema compile both cost far less than a decode step (xgrammar's masks are faster, its compiles slower);
llguidance is one 20 MB wheel with no dependencies, where xgrammar pulls
transformers and triton; and its Lark grammars embed JSON schemas (`%json`), which is what a tool call in
Qwen's XML format needs.

`Guide` follows one request through its answer. A prompt that leaves the model inside `<think>` (thinking
on) first runs free: the reasoning is never constrained. When the model writes `</think>`, or when
`thinking_token_budget` reasoning tokens have been written (then `</think>` and the blank line are forced),
the answer starts, and from there a grammar (if any) decides which tokens may come: the answer is exactly
the JSON, or the tool call, and the end-of-turn token is allowed only where the grammar is complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .parsers import schema_types

__all__ = ["GrammarBackend", "Guide", "json_grammar", "tool_call_grammar", "GrammarError"]


# JSON written as json.dumps writes it (", " and ": ", no other whitespace): flexible whitespace lets a
# sampling model spend its whole budget on blanks
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema or grammar that cannot be used (the message says what is wrong)."""


def json_grammar(schema) -> str:
    """The grammar of an answer that is JSON: `True` for any JSON object, else a JSON schema (dict)."""
    import llguidance

    if schema is True:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def _lark_string(text: str) -> str:
    return json.dumps(text)            # a JSON string literal is a valid Lark string literal


TERMINATOR = "\n</parameter>\n"


_SCHEMA_DEPTH = 64       # anyOf / oneOf levels of one parameter's schema (parsers.schema_types reads as many)


def _length(schema: dict, key: str, where: str) -> int | None:
    """A schema's minLength / maxLength: a non-negative integer (5.0 too, as JSON Schema allows), else GrammarError."""
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise GrammarError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    return value


def _check_schema(schema, where: str) -> None:
    """The fields _value_rules and parsers.schema_types read, type-checked before use (a GrammarError naming
    the field, where a wrong type would otherwise fail deep inside): type, enum, anyOf / oneOf, the length
    bounds. What goes to llguidance as %json it checks itself."""
    stack = [(schema, where, 0)]
    while stack:
        schema, where, depth = stack.pop()
        if isinstance(schema, bool):
            continue
        if not isinstance(schema, dict):
            raise GrammarError(f"{where}: a JSON schema must be an object or a boolean, got {type(schema).__name__}")
        if depth > _SCHEMA_DEPTH:
            raise GrammarError(f"{where}: anyOf / oneOf nested more than {_SCHEMA_DEPTH} levels deep")
        declared = schema.get("type")
        if declared is not None and not isinstance(declared, str) and not (
                isinstance(declared, list) and all(isinstance(t, str) for t in declared)):
            raise GrammarError(f"{where}.type: expected a type name or a list of them, got {declared!r}")
        if "enum" in schema and not isinstance(schema["enum"], list):
            raise GrammarError(f"{where}.enum: expected a list, got {type(schema['enum']).__name__}")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list):
                    raise GrammarError(f"{where}.{key}: expected a list of schemas, got {type(subs).__name__}")
                inner = f"{where}.{key}" if len(where) < 120 else where      # (messages stay short)
                stack += [(sub, f"{inner}[{i}]", depth + 1) for i, sub in enumerate(subs)]
        lo, hi = _length(schema, "minLength", where), _length(schema, "maxLength", where)
        if lo is not None and hi is not None and lo > hi:
            raise GrammarError(f"{where}: minLength {lo} is above maxLength {hi}")


def _value_rules(rule: str, schema, where: str = "schema") -> list[str]:
    """Lark rules for one parameter value and its closing tag, as the template writes it and our parser
    reads it back (parsers._convert): strings raw (enums and consts of strings as their literals, length
    bounds kept; `pattern` and `format` are not enforced), every other type as JSON of its schema. A union
    with string is raw text (the parser turns exact JSON of the union's other types back into them).
    A field of the wrong type is a GrammarError naming `where` (the parameter)."""
    _check_schema(schema, where)
    schema = schema if isinstance(schema, dict) else {}
    literals = schema.get("enum") if isinstance(schema.get("enum"), list) else (
        [schema["const"]] if "const" in schema else None)
    if literals and all(isinstance(v, str) for v in literals):
        return [f"{rule}: (" + " | ".join(_lark_string(v) for v in literals) + f") {_lark_string(TERMINATOR)}"]
    types = schema_types(schema)
    if not types or "string" in types:
        lo = (_length(schema, "minLength", where) or 0) if types == {"string"} else 0
        hi = _length(schema, "maxLength", where) if types == {"string"} else None
        count = f"{{{lo},{hi}}}" if hi is not None else (f"{{{lo},}}" if lo else "*")
        return [f"{rule}[lazy]: /(?s:.{count})\\n<\\/parameter>\\n/"]
    return [f"{rule}: %json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT})} {_lark_string(TERMINATOR)}"]


def tool_call_grammar(tools: list[dict], required: bool, max_calls: int | None = None) -> str:
    """The grammar of a turn that calls one of `tools` (OpenAI function tools) in Qwen's XML format, with
    arguments valid for the tool's parameter schema: required parameters present, no other keys when
    `additionalProperties` is false, values typed (strings as raw text, anything else as JSON of its
    schema). `required`: the turn is one or more calls; else text or calls (`tool_choice: auto` with
    strict tools). `max_calls`: at most that many calls (1 for `parallel_tool_calls: false`).
    A schema field of the wrong type (`properties: [1]`, `required: 5`, `minLength: "x"`) is a GrammarError
    naming the function and the field."""
    if not tools:
        raise GrammarError("no tools to call")
    rules, calls = [], []
    for t, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise GrammarError(f"tool {t}: expected a function with a name")
        name, params = spec["name"], spec.get("parameters") or {}
        where = f"function {name!r}: parameters"
        if not isinstance(params, dict):
            raise GrammarError(f"{where}: expected a JSON schema object, got {type(params).__name__}")
        _check_schema(params, where)               # its own type / enum / anyOf, though only properties are used
        props = params.get("properties") or {}
        if not isinstance(props, dict):
            raise GrammarError(f"{where}.properties: expected an object, got {type(props).__name__}")
        required_keys = params.get("required") or []
        if not isinstance(required_keys, list) or not all(isinstance(k, str) for k in required_keys):
            raise GrammarError(f"{where}.required: expected a list of property names, got {required_keys!r}"[:200])
        required_keys = set(required_keys)         # (a strict call gives no key outside the schema)
        parts = []
        for k, (key, sub) in enumerate(props.items()):
            rule = f"t{t}_p{k}"
            rules.append(f"{rule}: {_lark_string(f'<parameter={key}>' + chr(10))} {rule}_v")
            rules += _value_rules(f"{rule}_v", sub, f"{where}.properties.{key}")
            parts.append(rule if key in required_keys else f"{rule}?")
        body = " ".join(parts)
        rules.append(f"t{t}: <tool_call> {_lark_string(chr(10) + f'<function={name}>' + chr(10))} {body} "
                     f"{_lark_string('</function>' + chr(10))} </tool_call>")
        calls.append(f"t{t}")
    rules.append("call: " + " | ".join(calls))
    more = '("\\n" call)*' if max_calls is None else " ".join(['("\\n" call)?'] * (max_calls - 1))
    if required:
        rules.insert(0, f"start: call {more}")
    else:
        rules.insert(0, f"start: free | free_text? call {more}")
        rules.append("free: /(?s:.*)/")
        rules.append("free_text[lazy]: /(?s:.*)\\n\\n/")
    return "\n".join(rules)


class GrammarBackend:
    """llguidance over the checkpoint's own tokenizer.json (loaded once, on first use: ~2 s)."""

    def __init__(self, tokenizer_file: str | Path, vocab_size: int, eos_ids):
        self.tokenizer_file, self.vocab_size, self.eos_ids = str(tokenizer_file), vocab_size, list(eos_ids)
        self._tok = None
        self._valid: set[str] = set()               # grammars already checked (server and engine both ask)

    @property
    def tokenizer(self):
        if self._tok is None:
            import llguidance

            self._tok = llguidance.LLTokenizer(self.tokenizer_file, n_vocab=self.vocab_size,
                                               eos_token=self.eos_ids[0] if len(self.eos_ids) == 1 else self.eos_ids)
        return self._tok

    def warm(self) -> None:
        """Load the tokenizer and compute one mask inside a JSON string: llguidance builds its token tables
        on the first masks (seconds on this vocabulary), which the first constrained request would pay."""
        matcher = self.matcher(json_grammar({"type": "object", "properties": {"a": {"type": "string"}}}))
        for t in self.tokenizer.tokenize_str('{"a": "x'):
            matcher.consume_token(t)
        for _ in range(2):
            Guide._compute(matcher, self.vocab_size)

    def check(self, grammar: str, what: str = "grammar") -> None:
        """Raises GrammarError ("invalid <what>: why") for a grammar llguidance cannot use."""
        import llguidance

        if grammar in self._valid:
            return
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if not error:
            if len(self._valid) >= 256:              # agents repeat a handful of schemas: a small bound
                self._valid.clear()
            self._valid.add(grammar)
            return
        why = " ".join(line.strip() for line in error.strip().splitlines()[:3])
        raise GrammarError(f"invalid {what}: {why}")

    def matcher(self, grammar: str):
        import llguidance

        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)


_POOL = None


def _pool():
    """One worker thread: masks are computed there while the model's forward runs (both release the GIL)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(1, thread_name_prefix="qwen36-grammar")
    return _POOL


class Guide:
    """Per request: the reasoning (free, budgeted), then the answer (constrained when a grammar is set).

    Phases: "think" (the prompt ended inside `<think>`), "blank" (the blank line after `</think>` is being
    forced: after a forced `</think>`, or before a constrained answer), "answer"."""

    def __init__(self, backend: GrammarBackend | None, grammar: str | None, budget: int | None, thinking: bool,
                 think_end: int, blank_line: list[int]):
        self.backend, self.grammar, self.budget = backend, grammar, budget
        self.think_end, self.blank_line = think_end, list(blank_line)
        self.reasoning_tokens = 0
        self.forced: list[int] = []                 # tokens to emit instead of sampling, in order
        self.matcher = None
        self._pending = None                        # a mask being computed (prefetch)
        self.phase = "think" if thinking else "answer"
        if not thinking:
            self._answer()

    def _answer(self) -> None:
        self.phase = "answer"
        if self.grammar is not None:
            self.matcher = self.backend.matcher(self.grammar)

    def next_forced(self) -> int | None:
        """A token to emit instead of sampling, or None."""
        if self.phase == "think" and self.budget is not None and self.reasoning_tokens >= self.budget:
            self.forced = [self.think_end]           # the budget is spent: reasoning ends here
        return self.forced[0] if self.forced else None

    def prefetch(self, vocab: int) -> None:
        """Start computing the next mask (the engine calls this before the forward pass)."""
        if self.matcher is not None and not self.forced and self._pending is None and self.next_forced() is None:
            self._pending = _pool().submit(self._mask, vocab)

    def allowed(self, vocab: int) -> torch.Tensor | None:
        """Boolean mask [vocab] of the tokens the grammar allows now (None: anything may come)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending.result()
        if self.matcher is None or self.forced:
            return None
        return self._mask(vocab)

    def _mask(self, vocab: int) -> torch.Tensor:
        return self._compute(self.matcher, vocab)

    @staticmethod
    def _compute(matcher, vocab: int) -> torch.Tensor:
        import llguidance.numpy as ln
        import numpy as np

        mask = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
        ln.fill_next_token_bitmask(matcher, mask, 0)
        bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")   # bit i of word w: token 32w + i
        return torch.from_numpy(bits.view(np.bool_))[:vocab]

    def consume(self, tok: int) -> None:
        """The token that was emitted (sampled or forced)."""
        was_forced = bool(self.forced) and self.forced[0] == tok
        if was_forced:
            self.forced.pop(0)
        if self.phase == "think":
            if tok != self.think_end:
                self.reasoning_tokens += 1
                return
            # after a forced end, or before a constrained answer, the blank line is forced too
            if was_forced or self.grammar is not None:
                self.phase, self.forced = "blank", list(self.blank_line)
            else:
                self.phase = "answer"
            return
        if self.phase == "blank":
            if not self.forced:
                self._answer()
            return
        if self.matcher is not None:
            self.matcher.consume_token(tok)
