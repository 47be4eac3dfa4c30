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
  * Calls start at `<tool_call>` followed (after whitespace) by `<function=`, or at a bare
    `<function=NAME>` at the start of a line (the model skipped `<tool_call>`; only with a valid name, of a
    given tool when tools are given). A `<tool_call>` not followed by `<function=`, a bare `<function=`
    elsewhere, and anything inside an open Markdown code fence (an example being shown) are text.
  * From there on the text is held until the end of the output (or of the reasoning, at `</think>`) and
    only then decided, because a value may hold any text -- a file that quotes `</parameter>`,
    `<parameter=...>` lines or a whole example call -- and only what follows tells a closing tag from
    text inside the value. The grammar (`_CallGrammar`): `[<tool_call>] <function=NAME>` (NAME a valid
    identifier, so template debris like `{{ tc.name }}` is no call), parameters `<parameter=KEY>` VALUE
    end, then `</function>` and/or `</tool_call>` (at least one). A value ends at the first closing tag
    after which the rest parses, and a closing tag counts only when what follows is a parameter of the
    tool's schema not given yet, `</function>` or `</tool_call>`; malformed closers (`</parameter1>`,
    `</parameter_function>`, a bare `</parameter`) count too. The readings tried, from the most regular:
    see `_resolve_calls` (whole region vs. the longest well-formed prefix with text after it, values
    holding no half call, a broken first block followed by good calls, missing closing tags).
  * Blocks are recognised in reasoning too: a complete call inside the reasoning (with or without a later
    `</think>`) becomes a tool call and is cut out of the reasoning, which goes on after it. So a turn that
    calls tools without closing `</think>` gives reasoning = the text before the call and the call;
    calls written inside `<think>…</think>` are not lost (vLLM #39056).
  * Text that does not read as calls goes on as text; an opening block that reads as nothing (truncated,
    malformed) goes verbatim to content (also from inside the reasoning): never into tool-call arguments,
    so no half tags leak, and never dropped.
  * Exactly one leading and one trailing newline are removed from each value (the template adds them).
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
  * `feed()` holds back only text that could still start a marker (`</think>`, `<tool_call>`,
    `<function=`, a leading `<think>`), an opener until it is known whether it opens a call, whitespace
    as above, and the calls (until the end of the output, or `</think>`); `finish()` decides the rest.
  * Deltas are OpenAI chat-completion deltas: `{"reasoning_content": s}`, `{"content": s}` or one
    `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}` per call, with its full
    name and arguments, when the calls are decided.
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
        self._in_call = False           # _buf starts with tool calls, held until they can be decided
        self._scanned = 0               # how much of the held calls was searched for `</think>`
        self._line_start = True         # _buf starts a line (a bare `<function=` may open a call)
        self._fence = _Fence()          # Markdown code fences in the text so far: no calls inside them
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
        markers = (THINK_CLOSE, CALL_OPEN, FUNCTION_OPEN) if self._reasoning else (CALL_OPEN, FUNCTION_OPEN)
        at, marker = self._find_marker(markers)
        if at < 0:
            keep = 0 if final else _partial_marker_len(self._buf, markers)
            self._emit_text(self._buf[:len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._emit_text(self._buf[:at], out)
        self._buf = self._buf[at:]
        if marker == THINK_CLOSE:
            self._consume(len(THINK_CLOSE))
            self._reasoning = False
            self._fence = _Fence()
            return True
        status = False if self._fence.open else _opener(self._buf, self._line_start, self._schemas, final)
        if status is None:
            return False                                     # wait: not yet known whether a call starts
        if status:
            self._in_call = True
        else:                                                # literal text
            self._emit_text(marker, out)
            self._consume(len(marker))
        return True

    def _find_marker(self, markers: tuple[str, ...]) -> tuple[int, str]:
        found = [(i, m) for m in markers if (i := self._buf.find(m)) >= 0]
        return min(found) if found else (-1, "")

    def _consume(self, n: int) -> None:
        if n:
            self._line_start = self._buf[n - 1] == "\n"
            self._buf = self._buf[n:]

    def _step_call(self, final: bool, out: list[dict]) -> bool:
        """_buf starts with a call opener. The calls run to the end of the output (or of the reasoning, at
        `</think>`), and only there are they decided (see the module docstring): hold until then."""
        end = self._buf.find(THINK_CLOSE, max(0, self._scanned - len(THINK_CLOSE))) if self._reasoning else -1
        if end < 0 and not final:
            self._scanned = len(self._buf)
            return False
        self._scanned = 0
        region = self._buf if end < 0 else self._buf[:end]
        used, calls = _resolve_calls(region, self._schemas)
        if calls is None:                                    # not calls: the first block is content
            self._emit("content", region[:used], out)
        for name, arguments in calls or ():
            self._emit_call(name, arguments, out)
        self._in_call = False
        self._consume(used)
        return True

    def _emit_text(self, text: str, out: list[dict]) -> None:
        if text:
            self._line_start = text.endswith("\n")
            self._fence.feed(text)
        self._emit("reasoning_content" if self._reasoning else "content", text, out)

    def _emit(self, key: str, text: str, out: list[dict]) -> None:
        text = self._fields[key].push(text)
        if text:
            out.append({key: text})

    def _emit_call(self, name: str, arguments: str, out: list[dict]) -> None:
        out.append({"tool_calls": [{"index": self._n_calls, "id": f"call_{uuid.uuid4().hex[:24]}",
                                    "type": "function", "function": {"name": name, "arguments": arguments}}]})
        self._n_calls += 1


class _Fence:
    """Whether the text fed so far leaves a Markdown code fence (``` or ~~~) open: a tool call written
    inside one is an example being shown, not a call (as vLLM decides, #57541)."""
    _LINE = re.compile(r" {0,3}(`{3,}|~{3,})(.*)")

    def __init__(self):
        self.open = ""                  # the fence that opened the current block, "" outside
        self._line = ""                 # the current line so far

    def feed(self, text: str) -> None:
        *done, self._line = (self._line + text).split("\n")
        for line in done:
            m = self._LINE.match(line)
            if m is None:
                continue
            fence, rest = m.groups()
            if not self.open:
                if not (fence[0] == "`" and "`" in rest):     # ``` with a backtick after it is inline code
                    self.open = fence
            elif fence[0] == self.open[0] and len(fence) >= len(self.open) and not rest.strip():
                self.open = ""


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a marker."""
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


# ---- tool calls ----------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}\Z")
_NAME_WAIT = 160          # a `<function=` with no `>` this far on is text


def _opener(buf: str, line_start: bool, schemas: dict, final: bool) -> bool | None:
    """Does the marker at the start of `buf` open a tool call? None: not known until more text comes.
    `<tool_call>` does when `<function=` follows; a bare `<function=NAME>` (the model skipped
    `<tool_call>`) only at the start of a line, with a valid name, of a given tool when tools are given."""
    if buf.startswith(CALL_OPEN):
        after = buf[len(CALL_OPEN):].lstrip()
        if after.startswith(FUNCTION_OPEN):
            return True
        return None if not final and FUNCTION_OPEN.startswith(after) else False
    if not line_start:
        return False
    m = _FUNCTION_RE.match(buf)
    if m is None:
        rest = buf[len(FUNCTION_OPEN):]
        waiting = not final and len(rest) < _NAME_WAIT and not any(c in rest for c in "<>\n")
        return None if waiting else False
    name = m.group(1).strip()
    return bool(_NAME_RE.match(name)) and (not schemas or name in schemas)


def _resolve_calls(region: str, schemas: dict) -> tuple[int, list[tuple[str, str]] | None]:
    """`region` starts with a call opener and runs to the end of the output (or of the reasoning).

    Returns (characters used, [(name, JSON arguments)]). A region can often be read more than one way (a
    value may hold tag-like text), so readings are tried from the most to the least regular; within each,
    the whole region as calls and whitespace, then the longest prefix ending at a closing tag that is
    (the rest goes on as text), and parameter names by the tool's schema, then any names:
      1. every value ends at its closing tag and holds no half of a call (`_balanced`);
      2. the first block is broken (truncated, say) and calls read as in 1 follow it: the block is content;
      3. values may hold half calls (source code quoting `</tool_call>`);
      4.-6. the same with closing tags of values missing (a value then ends before the next parameter or
         the function's end).
    (n, None) when nothing reads as calls: the first n characters (the opening block) are then content."""
    budget = [_STEPS]                                        # shared: text built to make it backtrack stops
    close, reopen = region.find(CALL_CLOSE), region.find(CALL_OPEN, 1)
    block = min([i for i in (close + len(CALL_CLOSE) if close >= 0 else -1, reopen) if i > 0], default=len(region))
    for recover in (False, True):
        found = _try_calls(region, schemas, False, recover, budget)
        if found is not None:
            return found
        if block < len(region) and _try_calls(region[block:], schemas, False, recover, budget) is not None:
            return block, None
        found = _try_calls(region, schemas, True, recover, budget)
        if found is not None:
            return found
    return block, None


def _try_calls(region: str, schemas: dict, nested: bool, recover: bool, budget: list[int]) -> tuple[int, list] | None:
    ends = [m.end() for m in _CALL_END_RE.finditer(region)]
    for cut in [len(region)] + ends[::-1]:
        for strict in (True, False):
            calls = _CallGrammar(region[:cut], schemas, strict, nested, recover, budget).parse()
            if calls is not None:
                return cut, calls
        if budget[0] <= 0:
            return None
    return None


_CALL_END_RE = re.compile(r"</tool_call>|</function>(?!\s*</tool_call>)")
_FUNCTION_RE = re.compile(r"<function=([^<>\n]*)>")
_PARAM_RE = re.compile(r"<parameter=([^<>\n]*)>")
# where a value may end: a closing tag (also the malformed `</parameter1>`, `</parameter_function>` and a bare
# `</parameter`), or, its closing tag missing, before a line opening the next parameter or the function's end
_VALUE_END_RE = re.compile(r"</parameter\w*>?|(?<=\n)(?=<parameter=)|(?=</function>)|(?=</tool_call>)")
_STEPS = 20_000           # parse steps per region before giving up


class _CallGrammar:
    """Parses text as one or more tool calls and whitespace, nothing else:

        call  := [<tool_call>] <function=NAME> (param)* [</function>] [</tool_call>]   (a closer required)
        param := <parameter=KEY> VALUE end-of-value

    A value ends at the first end-of-value after which the whole rest still parses, and an end-of-value
    counts only when what follows is another parameter of the tool (by its schema when `strict`; never one
    already given), `</function>` or `</tool_call>`. So a value may hold any text (tags, a whole example
    call) as long as the output around it is well formed."""

    def __init__(self, text: str, schemas: dict, strict: bool, nested: bool, recover: bool, budget: list[int]):
        self.text, self.schemas, self.strict, self.budget = text, schemas, strict, budget
        self.nested, self.recover = nested, recover
        self.failed: set = set()            # (position, tool, keys given) that cannot lead to a parse

    def parse(self) -> list[tuple[str, str]] | None:
        try:
            found = self._calls(0, [])
        except (RecursionError, _GiveUp):
            return None
        return [(name, json.dumps({k: _convert(v, self.schemas.get(name, {}).get(k)) for k, v in params},
                                  ensure_ascii=False)) for name, params in found] if found else None

    def _skip(self, pos: int) -> int:
        while pos < len(self.text) and self.text[pos].isspace():
            pos += 1
        return pos

    def _calls(self, pos: int, done: list) -> list | None:
        pos = self._skip(pos)
        if pos == len(self.text):
            return done or None
        wrapped = self.text.startswith(CALL_OPEN, pos)
        if wrapped:
            pos = self._skip(pos + len(CALL_OPEN))
        m = _FUNCTION_RE.match(self.text, pos)
        name = m.group(1).strip() if m else ""
        if not _NAME_RE.match(name) or (not wrapped and self.schemas and name not in self.schemas):
            return None
        return self._params(m.end(), name, [], done)

    def _key(self, pos: int, name: str, params: list) -> tuple[str, int] | None:
        m = _PARAM_RE.match(self.text, pos)
        if m is None:
            return None
        key, known = m.group(1).strip(), self.schemas.get(name)
        if not key or any(key == k for k, _ in params) or (self.strict and known and key not in known):
            return None
        return key, m.end()

    def _params(self, pos: int, name: str, params: list, done: list) -> list | None:
        """After a parameter (or the function's opening tag): another parameter, or the call's end."""
        state = (pos, name, tuple(sorted(k for k, _ in params)))
        if state in self.failed:
            return None
        found = self._params_at(pos, name, params, done)
        if found is None:
            self.failed.add(state)
        return found

    def _params_at(self, pos: int, name: str, params: list, done: list) -> list | None:
        self._spend()
        pos = self._skip(pos)
        key = self._key(pos, name, params)
        if key is not None:
            return self._value(key[1], key[0], name, params, done)
        closed = False
        if self.text.startswith(FUNCTION_CLOSE, pos):
            pos, closed = self._skip(pos + len(FUNCTION_CLOSE)), True
        if self.text.startswith(CALL_CLOSE, pos):
            pos, closed = pos + len(CALL_CLOSE), True
        if not closed:
            return None
        return self._calls(pos, done + [(name, params)])

    def _value(self, start: int, key: str, name: str, params: list, done: list) -> list | None:
        given = params + [(key, "")]
        for m in _VALUE_END_RE.finditer(self.text, start):
            self._spend()
            after = self._skip(m.end())
            follows = (self.text.startswith((FUNCTION_CLOSE, CALL_CLOSE), after)
                       or self._key(after, name, given) is not None)
            if m.start() == m.end() and not self.recover:      # an end with the closing tag missing:
                if follows and self.text.startswith(PARAM_OPEN, after) and _depth(self.text[start:m.start()]) == 0:
                    break                                      # a line opening a parameter of the tool
                continue                                       # ends the value, or reads as 4.-6.
            if not follows:
                continue
            value = self.text[start:m.start()]
            if not self.nested and not _balanced(value):
                continue
            value = _trim_value(value)
            found = self._params(m.end(), name, params + [(key, value)], done)
            if found is not None:
                return found
        return None


    def _spend(self) -> None:
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise _GiveUp


class _GiveUp(Exception):
    pass


def _trim_value(raw: str) -> str:
    """The template writes `<parameter=K>\nVALUE\n</parameter>`: one newline off each end. A closing tag
    indented on its own line (`\n    </parameter>`, a layout other engines' tests use, never the
    template's) marks an indented layout: there the value is stripped of all surrounding whitespace."""
    last_line = raw[raw.rfind("\n") + 1:]
    if "\n" in raw and last_line and last_line.isspace():
        return raw.strip()
    raw = raw[1:] if raw.startswith("\n") else raw
    return raw[:-1] if raw.endswith("\n") else raw


_CALL_TAGS_RE = re.compile(r"<tool_call>|</tool_call>")


def _depth(value: str) -> int:
    """How many `<tool_call>` blocks `value` leaves open; -1 when it closes one it did not open."""
    depth = 0
    for m in _CALL_TAGS_RE.finditer(value):
        depth += 1 if m.group(0) == CALL_OPEN else -1
        if depth < 0:
            return -1
    return depth


def _balanced(value: str) -> bool:
    """Every `<tool_call>` in `value` is closed in it and every `</tool_call>` opened: a whole example
    call may be part of a value, half of one is taken for the structure around it first."""
    return _depth(value) == 0


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


_SCHEMA_DEPTH = 64       # anyOf / oneOf levels followed (a request's JSON is at most 128 deep in all)


def schema_types(schema, _depth: int = 0) -> set[str]:
    """The JSON types a property schema allows ({} when it says nothing usable); structured.py builds
    tool-call grammars from the same reading (after checking the fields' types). A field of the wrong type
    says nothing here (a client's schema must never fail the parse of an answer), nor does nesting beyond
    _SCHEMA_DEPTH."""
    if not isinstance(schema, dict) or _depth > _SCHEMA_DEPTH:
        return set()
    declared = schema.get("type")
    types = {_type_name(t) for t in (declared if isinstance(declared, list) else [declared] if declared else [])}
    for key in ("anyOf", "oneOf"):
        for sub in schema[key] if isinstance(schema.get(key), list) else ():
            types |= schema_types(sub, _depth + 1)
    if not types - {None} and isinstance(schema.get("enum"), list):
        types = {_json_type(v) for v in schema["enum"]}
    if schema.get("nullable") is True:
        types.add("null")
    types.discard(None)
    return types


def _convert(raw: str, schema) -> object:
    types = schema_types(schema)
    if not types - {"string"}:
        return raw
    if "string" in types:   # a union with string: only exact JSON of another allowed type converts
        if "null" in types and raw.strip() == "None":           # (and Python's None where null is allowed)
            return None
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
