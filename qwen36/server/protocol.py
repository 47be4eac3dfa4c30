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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# accepted and ignored: they label, store or route a request elsewhere and never change what is generated
IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    # llama.cpp's server: prompt caching is always on here, slots are ours to pick, progress/timing extras
    "cache_prompt", "slot_id", "id_slot", "timings_per_token", "return_progress",
    # vLLM's: scheduling priority, a prefix-cache namespace, a client-chosen request id
    "priority", "cache_salt", "request_id",
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


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None


def load_json(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError("request body must be a JSON object")
    return data


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
    req = validate(model, data)
    if getattr(req, "reasoning_effort", None) is not None:
        effort_thinking(req.reasoning_effort, "reasoning_effort")   # a 400 naming it
    # values of supported fields that ask for something we do not do
    fmt = getattr(req, "response_format", None)
    if fmt is not None:
        response_schema(fmt)                                   # a 400 naming what is wrong
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
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[", "str", "list[", "dict[", "int", "union")))
        msg = err["msg"]
        if err.get("type") == "literal_error" and "role" in loc:
            msg = f"unknown role {err.get('input')!r}; expected one of system, developer, user, assistant, tool"
        raise APIError(f"invalid field {loc!r}: {msg}", param=loc or None) from None
