"""OpenAI request schemas and validation. Every rejection is an `APIError` naming the field.

A top-level field we do not implement is a 400 naming it (a client asking for structured output or audio
must not get silently different output), except `IGNORED_FIELDS`: bookkeeping fields that OpenAI, vLLM and
llama.cpp accept without any effect on the output. Inside messages, unknown keys reach the chat template
(as transformers passes them); inside tools and options they are ignored. Known fields with wrong types or
values are 400s with an OpenAI-style error object.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# accepted and ignored: they label, store or route a request elsewhere and never change what is generated
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key",
                            "prompt_cache_retention", "safety_identifier"})
_UNSUPPORTED = {
    "functions": "the legacy functions API is not supported; use 'tools'",
    "function_call": "the legacy functions API is not supported; use 'tool_choice'",
    "audio": "audio output is not supported", "modalities": "only [\"text\"] output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "reasoning_effort": "not supported; turn thinking off with chat_template_kwargs {\"enable_thinking\": false}",
    "best_of": "only best_of = 1 is supported", "suffix": "insertion (suffix) is not supported",
}


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
    for name, value in data.items():
        if name not in model.model_fields and name not in IGNORED_FIELDS and value is not None:
            why = _UNSUPPORTED.get(name, "this server does not support it")
            raise APIError(f"unsupported field {name!r}: {why}", param=name)
    req = validate(model, data)
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
