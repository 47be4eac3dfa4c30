"""Split raw Qwen3.6 assistant output into reasoning, content and tool calls (whole text or streamed).

Input is the decoded text of one assistant turn, special tokens as text, without the final `<|im_end|>`.
With thinking on, the prompt ends inside `<think>\\n`, so the output looks like
`{reasoning}\\n</think>\\n\\n{content}\\n\\n<tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n</parameter>\\n
</function>\\n</tool_call>`; with thinking off it is content and/or tool calls only.

One state machine does both jobs: `parse_assistant(text)` is `AssistantStreamParser` fed the whole text at
once, so streaming and whole-text parsing cannot disagree, whatever the chunking. The rules:

Reasoning
  * thinking=True: the output starts in reasoning; the first `</think>` ends it and the rest is content.
    With no `</think>` everything stays reasoning (truncated output), except tool calls (below).
  * thinking=False: the output is content. A `</think>` in it is literal text: the content before it has
    already been streamed, and moving it to reasoning afterwards would make streaming and whole-text
    results differ (vLLM splits only when not streaming).
  * In both modes an output that starts (after whitespace) with `<think>` is reasoning up to `</think>`:
    the stray `<think>` of old templates is dropped. A `<think>` anywhere else is literal text.

Tool calls
  * A tool call is a block from `<tool_call>` (followed, after optional whitespace, by `<function=`) to the
    first `</tool_call>`; a new `<tool_call>` before that cuts the block off (malformed), so values cannot
    contain these two tags. A `<tool_call>` not followed by `<function=` is literal text.
  * Blocks are recognised everywhere, in reasoning too: a complete block inside the reasoning (with or
    without a later `</think>`) becomes a tool call and is cut out of the reasoning, which goes on after
    it. So a turn that calls tools without closing `</think>` gives reasoning = the text before the call
    and the call; calls written inside `<think>…</think>` are not lost (vLLM #39056). Text after such a
    call with no `</think>` stays reasoning (vLLM would make it content).
  * Inside the block: `<function=NAME>`, then parameters `<parameter=KEY>` VALUE `</parameter>`, then an
    optional `</function>`; anything but whitespace between these parts makes the call malformed. A value
    ends at the first `</parameter>` followed (after whitespace) by `<parameter=` or the end of the
    function (its last `</function>`, else `</tool_call>`), so a value may itself contain `</parameter>`;
    or, when that closing tag is missing, before the next line starting with `<parameter=`, or at the end
    of the function. An unclosed value may not contain `</parameter>` (that call is malformed).
    Exactly one leading and one trailing newline are removed from each value; a repeated key keeps its
    last value.
  * A malformed block, or one cut off by the end of the output or by a new `<tool_call>`, goes verbatim
    to content (also from inside the reasoning): never into tool-call arguments, so no half tags leak,
    and never dropped.
  * Values are typed by the tool's JSON schema (tools in OpenAI form or flat `{"name", "parameters"}`):
    string/text/str and enums of strings stay verbatim; integer → int; number → int when integral, else
    float; boolean → "true"/"false" (any case); object/array → JSON, else a Python literal; null →
    None. For types without string, "null"/"None" also give None. A union that includes string (`type` list,
    anyOf/oneOf, nullable) converts only a value that is exact JSON of one of its other types, so
    `"007"` stays a string. A value that fails conversion stays the raw string. As vLLM's qwen3_coder:
    a parameter not in the schema, an unknown tool, or no tools given → raw string. Calls to unknown
    tools are still returned. Arguments are `json.dumps(..., ensure_ascii=False)` of the typed dict.

Whitespace and empty fields (what the chat template re-renders)
  * Reasoning is the concatenation of the reasoning text (tool-call blocks cut out), stripped; content
    likewise. So the `\\n\\n` after `</think>` and before `<tool_call>` go. Streaming drops leading
    whitespace and holds trailing whitespace until more text follows, giving the same strings.
  * An empty reasoning or content is None (OpenAI sends `content: null` with tool calls only); a
    streamed field that never got a delta merges to None too. `tool_calls` is [] when there are none.

Streaming
  * `feed()` holds back only text that could still start a marker (`</think>`, `<tool_call>`, a
    leading `<think>`), a `<tool_call>` until it is known whether `<function=` follows, whitespace as
    above, and an open tool-call block; `finish()` releases the rest as text.
  * Deltas are OpenAI chat-completion deltas: `{"reasoning_content": s}`, `{"content": s}` or one
    `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}` per completed call,
    with its full name and arguments.
"""
from __future__ import annotations

import ast
import json
import math
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"

_FUNCTION_RE = re.compile(r"<function=([^<>\n]*)>")
_PARAM_RE = re.compile(r"<parameter=([^<>\n]*)>")
_PARAM_CLOSE_RE = re.compile(r"</parameter>(?=\s*(?:<parameter=|\Z))")


@dataclass
class ChatResult:
    content: str | None
    reasoning_content: str | None
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None      # set by LLM.chat: "stop" | "length" | "tool_calls"


def parse_assistant(text: str, tools: list | None = None, thinking: bool = True) -> ChatResult:
    """Parse one whole assistant output (rules in the module docstring)."""
    parser = AssistantStreamParser(tools, thinking)
    parser.feed(text)
    parser.finish()
    return parser.result()


def merge_deltas(deltas: list[dict]) -> ChatResult:
    """Merge streamed deltas as an OpenAI client does: strings concatenated, tool calls by index."""
    text = {"reasoning_content": [], "content": []}
    calls: dict[int, dict] = {}
    for delta in deltas:
        for key in text:
            if key in delta:
                text[key].append(delta[key])
        for part in delta.get("tool_calls", ()):
            call = calls.setdefault(part["index"], {"id": None, "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
            call["id"] = part.get("id") or call["id"]
            call["function"]["name"] += part.get("function", {}).get("name", "")
            call["function"]["arguments"] += part.get("function", {}).get("arguments", "")
    return ChatResult(content="".join(text["content"]) or None,
                      reasoning_content="".join(text["reasoning_content"]) or None,
                      tool_calls=[calls[i] for i in sorted(calls)])


class _Stripped:
    """Streams a text field as if the whole of it were `.strip()`ped."""

    def __init__(self):
        self.started = False
        self.held = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        return body


class AssistantStreamParser:
    """Incremental parser: `feed(delta)` and `finish()` return lists of OpenAI delta dicts."""

    def __init__(self, tools: list | None = None, thinking: bool = True):
        self._schemas = _tool_schemas(tools)
        self._reasoning = thinking      # which field plain text goes to
        self._at_start = True           # a leading `<think>` is still possible
        self._in_call = False           # _buf starts with an open tool-call block
        self._scanned = 0               # how far the open block was searched for its end
        self._buf = ""
        self._fields = {"reasoning_content": _Stripped(), "content": _Stripped()}
        self._n_calls = 0
        self._deltas: list[dict] = []
        self._finished = False

    def feed(self, text: str) -> list[dict]:
        if self._finished:
            raise RuntimeError("AssistantStreamParser.feed() after finish()")
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[dict]:
        """End of output: release everything held back (a partial marker is plain text)."""
        if self._finished:
            return []
        out = self._drain(final=True)
        self._finished = True
        return out

    def result(self) -> ChatResult:
        """Everything emitted so far, merged."""
        return merge_deltas(self._deltas)

    def _drain(self, final: bool) -> list[dict]:
        out: list[dict] = []
        while self._buf and self._step(final, out):
            pass
        self._deltas += out
        return out

    def _step(self, final: bool, out: list[dict]) -> bool:
        """Consume what can be decided; False when waiting for more text (or nothing is left)."""
        if self._at_start:
            return self._step_start(final)
        if self._in_call:
            return self._step_call(final, out)
        return self._step_text(final, out)

    def _step_start(self, final: bool) -> bool:
        head = self._buf.lstrip()
        if head.startswith(THINK_OPEN):
            self._buf = head[len(THINK_OPEN):]
            self._reasoning = True
        elif not final and THINK_OPEN.startswith(head):
            return False
        self._at_start = False
        return True

    def _step_text(self, final: bool, out: list[dict]) -> bool:
        markers = (THINK_CLOSE, CALL_OPEN) if self._reasoning else (CALL_OPEN,)
        found = [(i, m) for m in markers if (i := self._buf.find(m)) >= 0]
        if not found:
            keep = 0 if final else _partial_marker_len(self._buf, markers)
            self._emit_text(self._buf[:len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        at, marker = min(found)
        self._emit_text(self._buf[:at], out)
        self._buf = self._buf[at:]
        if marker == THINK_CLOSE:
            self._buf = self._buf[len(THINK_CLOSE):]
            self._reasoning = False
            return True
        return self._open_call(final, out)

    def _open_call(self, final: bool, out: list[dict]) -> bool:
        """_buf starts with `<tool_call>`: a block if `<function=` follows, else literal text."""
        after = self._buf[len(CALL_OPEN):].lstrip()
        if after.startswith(FUNCTION_OPEN):
            self._in_call, self._scanned = True, len(CALL_OPEN)
            return True
        if not final and FUNCTION_OPEN.startswith(after):
            return False
        self._emit_text(CALL_OPEN, out)
        self._buf = self._buf[len(CALL_OPEN):]
        return True

    def _step_call(self, final: bool, out: list[dict]) -> bool:
        """_buf starts with an open block: it ends after `</tool_call>`, or before a new `<tool_call>`."""
        start = max(len(CALL_OPEN), self._scanned - len(CALL_CLOSE) + 1)
        close, reopen = self._buf.find(CALL_CLOSE, start), self._buf.find(CALL_OPEN, start)
        ends = [i for i in (close + len(CALL_CLOSE) if close >= 0 else -1, reopen) if i >= 0]
        if not ends and not final:
            self._scanned = len(self._buf)
            return False
        end = min(ends, default=len(self._buf))
        block, self._buf = self._buf[:end], self._buf[end:]
        self._in_call = False
        call = _parse_call(block, self._schemas)
        if call is None:
            self._emit("content", block, out)
        else:
            self._emit_call(*call, out)
        return True

    def _emit_text(self, text: str, out: list[dict]) -> None:
        self._emit("reasoning_content" if self._reasoning else "content", text, out)

    def _emit(self, key: str, text: str, out: list[dict]) -> None:
        text = self._fields[key].push(text)
        if text:
            out.append({key: text})

    def _emit_call(self, name: str, arguments: str, out: list[dict]) -> None:
        out.append({"tool_calls": [{"index": self._n_calls, "id": f"call_{uuid.uuid4().hex[:24]}",
                                    "type": "function", "function": {"name": name, "arguments": arguments}}]})
        self._n_calls += 1


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a marker."""
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


# ---- one tool-call block -------------------------------------------------------------------------------

def _parse_call(block: str, schemas: dict[str, dict]) -> tuple[str, str] | None:
    """(name, JSON arguments) of a complete `<tool_call>…</tool_call>` block, None if malformed."""
    if not block.endswith(CALL_CLOSE):
        return None
    inner = block[len(CALL_OPEN):-len(CALL_CLOSE)].strip()
    m = _FUNCTION_RE.match(inner)
    name = m.group(1).strip() if m else ""
    if not name:
        return None
    body = inner[m.end():]
    close = body.rfind(FUNCTION_CLOSE)
    if close >= 0:
        if body[close + len(FUNCTION_CLOSE):].strip():
            return None
        body = body[:close]
    params = _parse_params(body)
    if params is None:
        return None
    properties = schemas.get(name, {})
    arguments = {key: _convert(value, properties.get(key)) for key, value in params}
    return name, json.dumps(arguments, ensure_ascii=False)


def _parse_params(body: str) -> list[tuple[str, str]] | None:
    """[(key, raw value)] of a function body, None if anything but parameters and whitespace is there."""
    params, pos = [], 0
    while rest := body[pos:].lstrip():
        m = _PARAM_RE.match(body, len(body) - len(rest))
        key = m.group(1).strip() if m else ""
        if not key:
            return None
        value, pos = _param_value(body, m.end())
        if value is None:
            return None
        params.append((key, value))
    return params


def _param_value(body: str, start: int) -> tuple[str | None, int]:
    """The value starting at `start` (one newline trimmed at each end) and where the next part begins."""
    closed = _PARAM_CLOSE_RE.search(body, start)
    unclosed = body.find("\n" + PARAM_OPEN, start)
    if closed and (unclosed < 0 or closed.start() <= unclosed):
        value, pos = body[start:closed.start()], closed.end()
    else:
        pos = len(body) if unclosed < 0 else unclosed + 1
        value = body[start:pos]
        if PARAM_CLOSE in value:
            return None, pos
    value = value[1:] if value.startswith("\n") else value
    return (value[:-1] if value.endswith("\n") else value), pos


# ---- typing values by the tool schema --------------------------------------------------------------------

def _tool_schemas(tools: list | None) -> dict[str, dict]:
    """{tool name: its parameters' `properties`} from OpenAI-form or flat tool definitions."""
    schemas = {}
    for tool in tools or ():
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            parameters = spec.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, dict) else None
            schemas[spec["name"]] = properties if isinstance(properties, dict) else {}
    return schemas


_TYPE_NAMES = {"string": "string", "str": "string", "text": "string", "number": "number", "float": "number",
               "double": "number", "boolean": "boolean", "bool": "boolean", "object": "object", "dict": "object",
               "array": "array", "list": "array", "null": "null", "none": "null"}


def _type_name(name) -> str | None:
    name = str(name).lower()
    if name.startswith(("int", "uint", "long", "short")):
        return "integer"
    return _TYPE_NAMES.get(name)


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", dict: "object", list: "array"}.get(type(value), "null")


def _schema_types(schema) -> set[str]:
    """The JSON types a property schema allows ({} when it says nothing usable)."""
    if not isinstance(schema, dict):
        return set()
    declared = schema.get("type")
    types = {_type_name(t) for t in (declared if isinstance(declared, list) else [declared] if declared else [])}
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            types |= _schema_types(sub)
    if not types - {None} and isinstance(schema.get("enum"), list):
        types = {_json_type(v) for v in schema["enum"]}
    if schema.get("nullable") is True:
        types.add("null")
    types.discard(None)
    return types


def _convert(raw: str, schema) -> object:
    types = _schema_types(schema)
    if not types - {"string"}:
        return raw
    if "string" in types:   # a union with string: only exact JSON of another allowed type converts
        value = _strict_json(raw)
        if value is _FAIL:
            return raw
        kind = _json_type(value)
        allowed = kind in types or (kind == "integer" and "number" in types)
        return value if allowed and kind != "string" else raw
    for kind in ("null", "boolean", "integer", "number", "object", "array"):
        if kind in types or kind == "null":
            value = _CONVERTERS[kind](raw.strip())
            if value is not _FAIL:
                return value
    return raw


_FAIL = object()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _strict_json(text: str):
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _FAIL


def _to_null(text: str):
    return None if text.lower() in ("null", "none") else _FAIL


def _to_bool(text: str):
    return {"true": True, "false": False}.get(text.lower(), _FAIL)


def _to_int(text: str):
    try:
        return int(text)
    except ValueError:
        value = _to_number(text)
        return value if isinstance(value, int) else _FAIL


def _to_number(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return _FAIL
    if not math.isfinite(value):
        return _FAIL
    return int(value) if value.is_integer() else value


def _to_structure(text: str, kind: type):
    value = _strict_json(text)
    if value is _FAIL:
        try:
            value = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return _FAIL
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return _FAIL
    return value if isinstance(value, kind) else _FAIL


_CONVERTERS = {"null": _to_null, "boolean": _to_bool, "integer": _to_int, "number": _to_number,
               "object": lambda text: _to_structure(text, dict), "array": lambda text: _to_structure(text, list)}
