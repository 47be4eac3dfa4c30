"""OpenAI request schemas and validation. Every rejection is an `APIError` naming the field.

A top-level field we do not implement is a 400 naming it (a client asking for structured output or audio
must not get silently different output), except `IGNORED_FIELDS`: bookkeeping fields that OpenAI, vLLM and
llama.cpp accept without any effect on the output (logged at debug), and `NOOP_VALUES`: fields of other
servers' dialects accepted only at the value that does nothing. Inside messages, unknown keys reach the chat
template (as transformers passes them); inside tools and options they are ignored. Known fields with wrong types or
values are 400s with an OpenAI-style error object.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

log = logging.getLogger("qwen36.server")


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ContextLengthError(APIError):
    """The prompt does not fit the context: OpenAI's code context_length_exceeded; Anthropic's adapter words it
    as Anthropic does ("prompt is too long: N tokens > M maximum"), which agent clients act on (compaction)."""

    def __init__(self, prompt_tokens: int, limit: int, message: str | None = None):
        super().__init__(message or f"this model's maximum context length is {limit} tokens, but the prompt has "
                         f"{prompt_tokens} tokens", param="messages", code="context_length_exceeded")
        self.prompt_tokens, self.limit = prompt_tokens, limit


# ---- request-size bounds ---------------------------------------------------------------------------------
# Each is a 400 naming the field. They bound the work one request can ask for (per-token stop matching and
# biases on the engine thread every user shares, per-message work while rendering, engine requests queued)
# and sit far above what real clients send: Claude Code, Codex CLI, the OpenAI and Anthropic SDKs and agents in
# long sessions stay orders of magnitude below each of them.
MAX_JSON_DEPTH = 128          # nesting of the body (serde_json's limit); tool schemas and tool inputs of real
                              # agents nest < 20 deep, and 128 keeps every recursive walk far from Python's limit
MAX_SEQUENCES = 128           # prompts x n of one request (engine requests per HTTP request): one chat is n <= 16;
                              # batch clients (lm-eval-harness) send <= 64 prompts of n = 1
MAX_MESSAGES = 16_384         # messages (Responses: input items); a week-long agent session before compaction
                              # has a few thousand (each costs >= 4 tokens of a 262k context)
MAX_CONTENT_PARTS = 4_096     # content parts (blocks) of one message: agents send tens (parallel tool results)
MAX_TOOLS = 10_000            # tools, namespaced Responses tools included: Anthropic's tool search catalogue limit
                              # (deferred MCP tools), where OpenAI allows 128
MAX_STOP = 64                 # stop strings (Anthropic: stop_sequences); OpenAI allows 4, prompt presets a dozen
MAX_STOP_CHARS = 1_000        # characters of one stop string (real ones are end-of-turn markers: < 50)
MAX_LOGIT_BIAS = 1_024        # logit_bias entries; OpenAI allows 300
MAX_STOP_TOKEN_IDS = 256      # stop_token_ids (vLLM's extension; clients send the few end-of-turn ids)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# accepted and ignored: they label, store or route a request elsewhere and never change what is generated
IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    # llama.cpp's server: prompt caching is always on here, slots are ours to pick, progress/timing extras
    "cache_prompt", "slot_id", "id_slot", "timings_per_token", "return_progress",
    # vLLM's: scheduling priority, a prefix-cache namespace, a client-chosen request id
    "priority", "request_id",
})
# accepted only at the value that changes nothing (llama.cpp's n_probs = 0: no probabilities returned)
NOOP_VALUES = {"n_probs": (0,)}
_UNSUPPORTED = {
    "functions": "the legacy functions API is not supported; use 'tools'",
    "function_call": "the legacy functions API is not supported; use 'tool_choice'",
    "audio": "audio output is not supported", "modalities": "only [\"text\"] output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "best_of": "only best_of = 1 is supported", "suffix": "insertion (suffix) is not supported",
    "n_probs": "token probabilities in llama.cpp's form are not supported; use logprobs / top_logprobs",
}

# Reasoning effort (chat completions' `reasoning_effort`, Responses' `reasoning.effort`, Anthropic's
# `output_config.effort`) -> (thinking on, thinking-token budget). "none" / "minimal" turn thinking off;
# "low" and "medium" cap the reasoning (then `</think>` is forced, see qwen36/structured.py); "high" and
# above let the model decide. An explicit `enable_thinking` / `thinking_token_budget` wins over the effort.
EFFORTS: dict[str, tuple[bool, int | None]] = {
    "none": (False, None), "minimal": (False, None), "low": (True, 1024), "medium": (True, 8192),
    "high": (True, None), "xhigh": (True, None), "max": (True, None)}


def effort_thinking(effort, param: str) -> tuple[bool, int | None]:
    """A reasoning effort -> (enable_thinking, thinking_token_budget); an unknown effort is a 400 naming param."""
    if not isinstance(effort, str) or effort not in EFFORTS:
        raise APIError(f"{param}: expected one of {', '.join(map(repr, EFFORTS))}, got {effort!r}", param=param)
    return EFFORTS[effort]


class StreamOptions(_Model):
    include_usage: bool = False


class FunctionCall(_Model):
    name: str
    arguments: str | dict | None = None


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    model_config = ConfigDict(extra="allow")   # reasoning_content, name, tool_call_id, ... reach the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None                # its calls are constrained to the parameters' schema


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: dict[str, str]


class SamplingFields(_Model):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False                   # vLLM's extension (benchmark clients send it)
    # vLLM's: the prefix cache is shared only between requests with the same salt (one per tenant)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    thinking_token_budget: int | None = Field(default=None, ge=0)   # vLLM's name
    reasoning_effort: str | None = None        # EFFORTS: thinking on/off and a thinking-token budget
    modalities: list[str] | None = None
    # read from the fields above once, when the request is validated (a 400 naming the field)
    _response_schema: Any = PrivateAttr(default=None)
    _effort: tuple[bool | None, int | None] = PrivateAttr(default=(None, None))

    @model_validator(mode="after")
    def _read_schema_and_effort(self):
        self._response_schema = response_schema(self.response_format)
        if self.reasoning_effort is not None:
            self._effort = effort_thinking(self.reasoning_effort, "reasoning_effort")
        return self

    @property
    def answer_schema(self):
        """The answer's JSON schema from response_format: None (text), True (any JSON object) or a dict."""
        return self._response_schema

    @property
    def thinking_effort(self) -> tuple[bool | None, int | None]:
        """reasoning_effort as (enable_thinking, thinking budget); (None, None) when not given."""
        return self._effort


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None


def load_json(raw: bytes) -> dict:
    """Body bytes -> a JSON object, or APIError: invalid JSON, nesting beyond MAX_JSON_DEPTH and integers beyond
    Python's 4,300-digit conversion limit name the top-level field they are in."""
    try:
        data = json.loads(raw)
    except RecursionError:                          # the C decoder's own guard, ~1,000 levels down
        field = _failing_field(raw)
        raise APIError(f"{field or 'request body'}: JSON nested more than {MAX_JSON_DEPTH} levels deep",
                       param=field) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"request body is not valid JSON: {e}") from None
    except ValueError:                              # int("9" * 4301): Python's integer-string limit
        field = _failing_field(raw)
        raise APIError(f"{field or 'request body'}: a number too long to read (integers are limited to "
                       f"{sys.get_int_max_str_digits()} digits)", param=field) from None
    if not isinstance(data, dict):
        raise APIError("request body must be a JSON object")
    if _json_depth(raw, data) > MAX_JSON_DEPTH:
        path = _too_deep(data)
        shown = path if len(path) <= 60 else path[:60] + "..."
        raise APIError(f"{shown}: JSON nested more than {MAX_JSON_DEPTH} levels deep",
                       param=re.match(r"[^.\[]*", path).group(0))
    return data


_STRING_RE = re.compile(rb'"[^"]*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[list(b"[{")], _BRACKET_STEP[list(b"]}")] = 1, -1


def _json_depth(raw: bytes, data) -> int:
    """The nesting depth of a body that parsed (the object itself is 1). On UTF-8 (what clients send) the
    brackets outside strings are counted in C: escaped backslashes, then escaped quotes go (pairs taken left
    to right, as JSON reads them; backslashes occur only inside strings), everything but brackets and quotes
    goes, then the strings, and numpy sums the rest. A 32 MB body costs tens of milliseconds, where walking the
    parsed values costs seconds. Other encodings walk the values."""
    if json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"):
        return max(depth for _, _, depth in _containers(data))
    text = bytes(raw)
    if b"\\" in text:                               # (base64 media has none: two copies saved)
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = text.translate(None, _NOT_STRUCTURE)
    steps = _BRACKET_STEP[np.frombuffer(_STRING_RE.sub(b"", text).translate(None, _NOT_BRACKETS), np.uint8)]
    depth = peak = 0
    for start in range(0, len(steps), 1 << 22):     # (bounded temporaries)
        run = np.cumsum(steps[start:start + (1 << 22)], dtype=np.int64) + depth
        peak, depth = max(peak, int(run.max())), int(run[-1])
    return peak


def _containers(data):
    """(container, path, depth) for every dict and list in a parsed value, depth first, without recursion."""
    stack = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        yield value, path, depth
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in reversed(list(items)):
            if isinstance(child, (dict, list)):
                where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
                stack.append((child, where, depth + 1))


def _too_deep(data) -> str:
    """Path (`messages[0].x[0]`) to the first container nested deeper than MAX_JSON_DEPTH."""
    return next(path for _, path, depth in _containers(data) if depth > MAX_JSON_DEPTH)


def _failing_field(raw: bytes) -> str | None:
    """The top-level field whose value json.loads cannot take (nesting, a huge integer): the object's values
    are decoded one by one (each in C) until one fails. None when the body is not an object of such fields."""
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError:
        return None
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    i = ws.match(text, 0).end()
    if not text.startswith("{", i):
        return None
    i += 1
    for _ in range(1_000):                          # (a body of a million fields is not read for a name)
        i = ws.match(text, i).end()
        try:
            key, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        i = ws.match(text, i).end()
        if not isinstance(key, str) or not text.startswith(":", i):
            return None
        try:
            _, i = decoder.raw_decode(text, ws.match(text, i + 1).end())
        except json.JSONDecodeError:
            return None
        except (RecursionError, ValueError):
            return key
        i = ws.match(text, i).end()
        if not text.startswith(",", i):
            return None
        i += 1
    return None


def check_sizes(data: dict) -> None:
    """The request-size bounds (MAX_* above) on a body before it is validated: a 400 naming the field. Applies
    to every API's names (chat's and completions' fields, Anthropic's `stop_sequences`, Responses' `input`)."""
    for field, limit in (("messages", MAX_MESSAGES), ("input", MAX_MESSAGES)):
        items = data.get(field)
        if not isinstance(items, list):
            continue
        if len(items) > limit:
            raise APIError(f"{field}: at most {limit} items, got {len(items)}", param=field)
        for i, item in enumerate(items):
            content = item.get("content") if isinstance(item, dict) else None
            if isinstance(content, list) and len(content) > MAX_CONTENT_PARTS:
                raise APIError(f"{field}[{i}].content: at most {MAX_CONTENT_PARTS} content parts, got {len(content)}",
                               param=field)
    system = data.get("system")
    if isinstance(system, list) and len(system) > MAX_CONTENT_PARTS:
        raise APIError(f"system: at most {MAX_CONTENT_PARTS} content blocks, got {len(system)}", param="system")
    tools = data.get("tools")
    if isinstance(tools, list):
        inner = (t.get("tools") for t in tools if isinstance(t, dict))      # (Responses' namespace tools)
        count = len(tools) + sum(len(x) for x in inner if isinstance(x, list))
        if count > MAX_TOOLS:
            raise APIError(f"tools: at most {MAX_TOOLS} tools, got {count}", param="tools")
    for field in ("stop", "stop_sequences"):
        stops = data.get(field)
        stops = [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, list):
            continue
        if len(stops) > MAX_STOP:
            raise APIError(f"{field}: at most {MAX_STOP} stop sequences, got {len(stops)}", param=field)
        for i, stop in enumerate(stops):
            if isinstance(stop, str) and len(stop) > MAX_STOP_CHARS:
                raise APIError(f"{field}[{i}]: at most {MAX_STOP_CHARS} characters, got {len(stop)}", param=field)
    for field, limit, what in (("stop_token_ids", MAX_STOP_TOKEN_IDS, "token ids"),
                               ("logit_bias", MAX_LOGIT_BIAS, "entries")):
        value = data.get(field)
        if isinstance(value, (list, dict)) and len(value) > limit:
            raise APIError(f"{field}: at most {limit} {what}, got {len(value)}", param=field)
    prompt, n = data.get("prompt"), data.get("n")
    if isinstance(prompt, list):
        prompts = len(prompt) if prompt and isinstance(prompt[0], (str, list)) else 1
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        if prompts > MAX_SEQUENCES:
            raise APIError(f"prompt: at most {MAX_SEQUENCES} prompts per request, got {prompts}", param="prompt")
        if prompts * n > MAX_SEQUENCES:
            raise APIError(f"n: {prompts} prompts x n = {n} asks for {prompts * n} sequences; at most "
                           f"{MAX_SEQUENCES} per request", param="n")


def parse(model: type[_Model], raw: bytes) -> Any:
    """Body bytes of an OpenAI request -> validated request, or APIError naming what is wrong."""
    data = load_json(raw)
    ignored = []
    for name, value in data.items():
        if name in model.model_fields or value is None:
            continue
        if name in IGNORED_FIELDS or value in NOOP_VALUES.get(name, ()):
            ignored.append(name)
            continue
        why = _UNSUPPORTED.get(name, "this server does not support it")
        raise APIError(f"unsupported field {name!r}: {why}", param=name)
    if ignored:
        log.debug("ignoring fields %s (they do not change the output)", sorted(ignored))
    req = validate(model, data)             # (reasoning_effort and response_format: read as it validates)
    # values of supported fields that ask for something we do not do
    if getattr(req, "modalities", None) not in (None, ["text"]):
        raise APIError(f"unsupported field 'modalities': {_UNSUPPORTED['modalities']}", param="modalities")
    if getattr(req, "best_of", None) not in (None, 1):
        raise APIError(f"unsupported field 'best_of': {_UNSUPPORTED['best_of']}", param="best_of")
    return req


def function_tool(index: int, name, description, parameters, strict=None) -> dict:
    """Another API's function tool (Anthropic's, Responses') as chat completions' `tools[index]` entry;
    `strict: true` keeps its meaning (calls constrained to the schema)."""
    if not isinstance(name, str):
        raise APIError(f"tools[{index}].name: required", param="tools")
    function = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if isinstance(description, str):
        function["description"] = description
    if isinstance(strict, bool):
        function["strict"] = strict
    return {"type": "function", "function": function}


def response_schema(fmt: dict | None):
    """OpenAI's response_format -> the answer's JSON schema: None (text), True (any JSON object) or a dict."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return True
    if kind != "json_schema":
        raise APIError(f"response_format.type: expected 'text', 'json_object' or 'json_schema', got {kind!r}",
                       param="response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError("response_format.json_schema: required, an object with 'name' and 'schema'",
                       param="response_format")
    schema = spec.get("schema", True)
    if schema is not True and not isinstance(schema, dict):
        raise APIError("response_format.json_schema.schema: must be a JSON schema object", param="response_format")
    return schema


def validate(model: type[BaseModel], data: bytes | dict) -> Any:
    """A JSON body (bytes or already loaded) -> the model, or APIError naming the field that is wrong."""
    if isinstance(data, (bytes, bytearray)):
        data = load_json(data)
    if isinstance(data, dict):
        check_sizes(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[", "str", "list[", "dict[", "int", "union")))
        msg = err["msg"]
        if err.get("type") == "literal_error" and "role" in loc:
            msg = f"unknown role {err.get('input')!r}; expected one of system, developer, user, assistant, tool"
        raise APIError(f"invalid field {loc!r}: {msg}", param=loc or None) from None
