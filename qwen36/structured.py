"""Constrained decoding: JSON schemas, strict tool calls and the thinking budget, with llguidance.

Why llguidance (measured here on the 248,320-token vocabulary, README "Structured output"): a token mask
takes ~0.15 ms per sequence and step (xgrammar: ~0.02 ms), both far below a decode step; a schema compiles
in ~25 ms (xgrammar ~50 ms); llguidance is one 20 MB wheel with no dependencies, where xgrammar pulls
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
from functools import lru_cache
from pathlib import Path

import torch

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
    except (ValueError, TypeError, RuntimeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def _lark_string(text: str) -> str:
    return json.dumps(text)            # a JSON string literal is a valid Lark string literal


def _is_string_schema(schema) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "string" and not (
        set(schema) & {"enum", "const", "pattern", "format", "minLength", "maxLength"})


def tool_call_grammar(tools: list[dict], required: bool) -> str:
    """The grammar of a turn that calls one of `tools` (OpenAI function tools) in Qwen's XML format, with
    arguments valid for the tool's parameter schema: required parameters present, no other keys when
    `additionalProperties` is false, values typed (strings as raw text, anything else as JSON of its
    schema). `required`: the turn is one or more calls; else text or calls (`tool_choice: auto` with
    strict tools)."""
    if not tools:
        raise GrammarError("no tools to call")
    rules, calls = [], []
    for t, tool in enumerate(tools):
        spec = tool.get("function", tool)
        name, params = spec["name"], spec.get("parameters") or {}
        props = params.get("properties") or {}
        required_keys = set(params.get("required") or ())
        if params.get("additionalProperties", True) is not False:
            pass                       # extra keys may be given, but a strict call sticks to the schema
        parts = []
        for k, (key, sub) in enumerate(props.items()):
            rule = f"t{t}_p{k}"
            head = _lark_string(f"<parameter={key}>\n")
            if _is_string_schema(sub):
                # raw text up to the closing tag (the template writes strings unquoted)
                rules.append(f"{rule}: {head} t{t}_p{k}_text")
                rules.append(f"t{t}_p{k}_text[lazy]: /(?s:.*)\\n<\\/parameter>\\n/")
            else:
                schema = {**(sub if isinstance(sub, dict) else {}), "x-guidance": JSON_LAYOUT}
                rules.append(f"{rule}: {head} t{t}_p{k}_json {_lark_string(chr(10) + '</parameter>' + chr(10))}")
                rules.append(f"t{t}_p{k}_json: %json {json.dumps(schema)}")
            parts.append(rule if key in required_keys else f"{rule}?")
        body = " ".join(parts)
        rules.append(f"t{t}: <tool_call> {_lark_string(chr(10) + f'<function={name}>' + chr(10))} {body} "
                     f"{_lark_string('</function>' + chr(10))} </tool_call>")
        calls.append(f"t{t}")
    rules.append("call: " + " | ".join(calls))
    if required:
        rules.insert(0, 'start: call ("\\n" call)*')
    else:
        rules.insert(0, 'start: free | free_text? call ("\\n" call)*')
        rules.append("free: /(?s:.*)/")
        rules.append("free_text[lazy]: /(?s:.*)\\n\\n/")
    return "\n".join(rules)


class GrammarBackend:
    """llguidance over the checkpoint's own tokenizer.json (loaded once, on first use: ~2 s)."""

    def __init__(self, tokenizer_file: str | Path, vocab_size: int, eos_ids):
        self.tokenizer_file, self.vocab_size, self.eos_ids = str(tokenizer_file), vocab_size, list(eos_ids)
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            import llguidance

            self._tok = llguidance.LLTokenizer(self.tokenizer_file, n_vocab=self.vocab_size,
                                               eos_token=self.eos_ids[0] if len(self.eos_ids) == 1 else self.eos_ids)
        return self._tok

    def check(self, grammar: str) -> None:
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(error.strip().splitlines()[0])

    def matcher(self, grammar: str):
        import llguidance

        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)


@lru_cache(maxsize=8)
def _bitmask(n_words: int) -> torch.Tensor:
    return torch.zeros(1, n_words, dtype=torch.int32)


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

    def allowed(self, vocab: int) -> torch.Tensor | None:
        """Boolean mask [vocab] of the tokens the grammar allows now (None: anything may come)."""
        if self.matcher is None or self.forced:
            return None
        import llguidance.torch as lt

        mask = _bitmask((vocab + 31) // 32)
        lt.fill_next_token_bitmask(self.matcher, mask, 0)
        bits = mask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)
        return (bits & 1).bool().flatten()[:vocab]

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

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (the answer is over)."""
        return self.matcher is not None and self.matcher.is_stopped()
