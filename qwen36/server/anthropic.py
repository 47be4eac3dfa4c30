"""Anthropic's Messages API on the one chat path: `POST /v1/messages` and `/v1/messages/count_tokens`.

Only translation lives here. A Messages request becomes a `ChatCompletionRequest` (system text, content
blocks as OpenAI messages: `tool_use` blocks as tool calls, `tool_result` blocks as tool messages,
`thinking` blocks as `reasoning_content`, base64 images as data-URL image parts, `system` messages inside
`messages` (Claude Code sends its environment that way) as late system messages, which the chat path merges
into the leading one; `tools` with `input_schema`, a `defer_loading` tool only once a `tool_reference`
block has loaded it; `tool_choice` auto / any / tool / none; `thinking` enabled / adaptive / disabled as
`enable_thinking`, `budget_tokens` and `output_config.effort` as the thinking budget), runs as a chat turn
(`chat.ChatTurn`), and its answer or events are written back as Anthropic content blocks (`thinking` with
an empty signature, `text`, `tool_use`), stop reasons and usage from the turn's `Done` (prompt tokens taken
from the prefix cache are `cache_read_input_tokens`), or as the event stream the SDK consumes.

Fields that cannot change the answer (`metadata`, `context_management`, `service_tier`, `thinking.display`,
cache_control marks, ...) are accepted and logged at debug; a field that would change it and is not
implemented (`mcp_servers`, unknown `thinking` types or efforts) is a 400 naming it.
"""
from __future__ import annotations

import asyncio

import json
import logging
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ..parsers import ChatResult
from .chat import ChatTurn, Done, Event, ReasoningDelta, TextDelta, ToolCallDelta, Usage, delta_events
from .protocol import APIError, ChatCompletionRequest, ContextLengthError, effort_thinking, function_tool, validate

log = logging.getLogger("qwen36.server")

# HTTP status -> Anthropic's error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}
STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens"}
# fields that would change the answer and are not implemented: a 400 naming them (when not empty)
_UNSUPPORTED = {"mcp_servers": "MCP connectors are not supported; give the client the MCP servers instead"}


def error_body(e: APIError) -> dict:
    message = f"prompt is too long: {e.prompt_tokens} tokens > {e.limit} maximum" \
        if isinstance(e, ContextLengthError) else e.message
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": message}}


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")      # service_tier, context_management, ...: accepted, ignored (logged)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None              # (older API versions and other clients still send these)
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None   # effort (the thinking budget), format (a JSON schema)
    stream: bool = False


def parse_request(raw: bytes, count_only: bool = False) -> MessagesRequest:
    req = validate(MessagesRequest, raw)
    if req.max_tokens is None and not count_only:
        raise APIError("max_tokens: Field required", param="max_tokens")
    extra = req.model_extra or {}
    for name, why in _UNSUPPORTED.items():
        if extra.get(name):
            raise APIError(f"unsupported field {name!r}: {why}", param=name)
    if extra:                                     # context_management, service_tier, container, ...
        log.debug("/v1/messages: ignoring fields %s", {k: extra[k] for k in sorted(extra)})
    return req


# ---- request -> chat request -----------------------------------------------------------------------------

def _text_of(blocks, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if blocks is not None and not isinstance(blocks, list):
        raise APIError(f"{where}: expected a string or a list of text blocks", param=where)
    texts = []
    for j, b in enumerate(blocks or ()):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise APIError(f"{where}[{j}]: expected a text block", param=where)
        texts.append(b["text"])
    return "\n\n".join(texts)


def _image(block: dict, where: str) -> dict:
    source = block.get("source")
    if not isinstance(source, dict):
        raise APIError(f"{where}.source: required", param=where)
    if source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise APIError(f"{where}.source: a base64 source needs media_type and data strings", param=where)
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise APIError(f"{where}.source.type: expected 'base64' or 'url'", param=where)


def _parts(blocks, where: str) -> str | list[dict]:
    """User-side content (a message or a tool result): text and image blocks -> OpenAI content parts."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise APIError(f"{where}: expected a string or a list of content blocks", param=where)
    parts = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            parts.append(_image(b, f"{where}[{j}]"))
        else:
            raise APIError(f"{where}[{j}]: unsupported content block type {kind!r}", param=where)
    return parts


def _tool_result(result, where: str, loaded: list[str]) -> str | list[dict]:
    """A tool_result's content; `tool_reference` blocks (a client-side tool search's answer) load the deferred
    tool they name (its definition joins the prompt's tools) and read as a line saying so."""
    if isinstance(result, list) and any(isinstance(b, dict) and b.get("type") == "tool_reference" for b in result):
        blocks = []
        for j, b in enumerate(result):
            if isinstance(b, dict) and b.get("type") == "tool_reference":
                name = b.get("tool_name")
                if not isinstance(name, str):
                    raise APIError(f"{where}[{j}].tool_name: required", param=where)
                loaded.append(name)
                b = {"type": "text", "text": f"Tool {name} loaded."}
            blocks.append(b)
        result = blocks
    return _parts(result, where)


def _messages(req: MessagesRequest, loaded: list[str] | None = None) -> list[dict]:
    """The chat messages; names of tools loaded by `tool_reference` blocks are appended to `loaded`."""
    loaded = [] if loaded is None else loaded
    out = []
    if req.system:
        out.append({"role": "system", "content": _text_of(req.system, "system")})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where}: expected an object", param=where)
        role, content = m.get("role"), m.get("content")
        if role == "system":                      # Claude Code's environment, reminders: merged into the first
            out.append({"role": "system", "content": _text_of(content, f"{where}.content")})
            continue
        if role not in ("user", "assistant"):
            raise APIError(f"{where}.role: expected 'user', 'assistant' or 'system', got {role!r}", param=where)
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(f"{where}.content: expected a string or a list of content blocks", param=where)
        if role == "assistant":
            out.append(_assistant(content, f"{where}.content"))
            continue
        pending: list[dict] = []                      # user blocks between tool results
        for j, b in enumerate(content):
            if isinstance(b, dict) and b.get("type") == "tool_result":
                if pending:
                    out.append({"role": "user", "content": _parts(pending, f"{where}.content")})
                    pending = []
                result = b.get("content")
                body = "" if result is None else _tool_result(result, f"{where}.content[{j}].content", loaded)
                if b.get("is_error") and isinstance(body, str):
                    body = f"Error: {body}" if body else "Error"
                out.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")), "content": body})
            else:
                pending.append(b)
        if pending:
            out.append({"role": "user", "content": _parts(pending, f"{where}.content")})
    return out


def _assistant(blocks: list, where: str) -> dict:
    text, reasoning, calls = [], [], []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "thinking" and isinstance(b.get("thinking"), str):
            reasoning.append(b["thinking"])
        elif kind == "redacted_thinking":
            continue                                  # opaque to us: nothing to render
        elif kind == "tool_use" and isinstance(b.get("name"), str):
            arguments = b.get("input") if b.get("input") is not None else {}
            if not isinstance(arguments, dict):
                raise APIError(f"{where}[{j}].input: expected an object", param=where)
            calls.append({"id": str(b.get("id", "")), "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
        else:
            raise APIError(f"{where}[{j}]: unsupported content block type {kind!r}", param=where)
    message: dict = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        message["reasoning_content"] = "\n\n".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: list[dict] | None, loaded: list[str]) -> list[dict] | None:
    """Custom tools as chat tools. A `defer_loading` tool is left out of the prompt (as Anthropic does) until
    a `tool_reference` block in a tool result has loaded it."""
    if not tools:
        return None
    out, names = [], set()
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise APIError(f"tools[{i}]: expected an object", param="tools")
        if isinstance(t.get("name"), str):             # (a custom tool without one is a 400 below)
            names.add(t["name"])
        if t.get("type") not in (None, "custom"):      # Anthropic's server tools (web search, bash, ...)
            log.warning("/v1/messages: skipping tools[%d] of type %r (only custom tools are served)", i, t.get("type"))
            continue
        if t.get("defer_loading") is True and t.get("name") not in loaded:
            log.debug("/v1/messages: tools[%d] %r is deferred and not loaded: left out of the prompt", i, t.get("name"))
            continue
        out.append(function_tool(i, t.get("name"), t.get("description"), t.get("input_schema"), t.get("strict")))
    missing = [n for n in loaded if n not in names]
    if missing:
        raise APIError(f"a tool_reference names {missing[0]!r}, which is not in tools", param="tools")
    return out or None


def _tool_choice(choice: dict | None, body: dict) -> None:
    if not choice:
        return
    kind = choice.get("type")
    if kind == "auto":
        body["tool_choice"] = "auto"
    elif kind == "any":
        body["tool_choice"] = "required"
    elif kind == "none":
        body["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise APIError("tool_choice: expected type 'auto', 'any', 'none' or 'tool' with a name", param="tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        body["parallel_tool_calls"] = False


def to_chat(req: MessagesRequest) -> ChatCompletionRequest:
    loaded: list[str] = []
    body: dict = {"messages": _messages(req, loaded), "max_tokens": req.max_tokens or 1, "stream": req.stream}
    tools = _tools(req.tools, loaded)
    _tool_choice(req.tool_choice, body)                   # checked even without tools
    if tools:
        body["tools"] = tools
    else:
        body.pop("tool_choice", None)
    _thinking(req, body)
    config = req.output_config or {}
    # the structured-outputs beta's top-level name, then output_config's
    fmt = config.get("format") if config.get("format") is not None else (req.model_extra or {}).get("output_format")
    if fmt is not None:                          # {"type": "json_schema", "schema": {...}}
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise APIError("output_config.format: expected {\"type\": \"json_schema\", \"schema\": {...}}",
                           param="output_config")
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    for ours, theirs in (("stop", "stop_sequences"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k")):
        if getattr(req, theirs) is not None:
            body[ours] = getattr(req, theirs)
    return validate(ChatCompletionRequest, body)


def _thinking(req: MessagesRequest, body: dict) -> None:
    """`thinking` and `output_config.effort` -> enable_thinking and a thinking budget. enabled / adaptive /
    between_tools: on; disabled: off; absent: the server's default (on). `budget_tokens` caps the reasoning;
    else the effort does (protocol.EFFORTS: low 1024 tokens, medium 8192, high / xhigh / max: the model
    decides; as with Anthropic, an effort alone does not turn thinking on, but OpenAI's "none" / "minimal"
    turn it off when `thinking` does not say). `display` ("omitted", "summarized") only shapes what is
    shown: the reasoning comes back whole."""
    thinking = req.thinking or {}
    kind = thinking.get("type")
    effort = (req.output_config or {}).get("effort")
    budget = None
    if effort is not None:
        on, budget = effort_thinking(effort, "output_config.effort")   # a 400 naming an unknown effort
        if kind is None and not on:
            kind = "disabled"
    if kind in ("enabled", "adaptive", "between_tools"):
        body["chat_template_kwargs"] = {"enable_thinking": True}
        tokens = thinking.get("budget_tokens")
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
            raise APIError(f"thinking.budget_tokens: expected a non-negative integer, got {tokens!r}",
                           param="thinking")
        if tokens is not None:
            budget = tokens
    elif kind == "disabled":
        body["chat_template_kwargs"] = {"enable_thinking": False}
        budget = None
    elif kind is not None:
        raise APIError("thinking.type: expected 'enabled', 'disabled', 'adaptive' or 'between_tools'",
                       param="thinking")
    if budget is not None:
        body["thinking_token_budget"] = budget
    if thinking.get("display") is not None:
        log.debug("/v1/messages: thinking.display %r: the reasoning is returned whole", thinking["display"])


# ---- chat results -> Anthropic ---------------------------------------------------------------------------

def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _usage(u: Usage) -> dict:
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": u.cached_tokens, "output_tokens": u.completion_tokens}


def _stop(choice_reason: str, stop_sequence: str | None) -> tuple[str, str | None]:
    if choice_reason == "stop" and stop_sequence is not None:
        return "stop_sequence", stop_sequence
    return STOP_REASONS.get(choice_reason, "end_turn"), None


class MessagesJob:
    """One /v1/messages request: a chat turn inside (`make_turn`: a chat request -> ChatTurn), Anthropic's
    shapes outside."""

    def __init__(self, req: MessagesRequest, make_turn):
        self.req = req
        self.turn: ChatTurn = make_turn(to_chat(req))
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.model = self.turn.ctx.config.served_model_name

    @property
    def started(self) -> bool:
        return self.turn.started

    async def prepare(self) -> None:
        await self.turn.prepare()

    def _message(self, content: list, stop_reason, stop_sequence, usage: dict) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    async def complete(self, request: Request) -> dict:
        [a] = await self.turn.answers()
        return self._message(_blocks(a.result), *_stop(a.done.finish_reason, a.done.stop_sequence), _usage(a.done.usage))

    async def stream(self, request: Request) -> AsyncIterator[str]:
        usage = {"input_tokens": len(self.turn.prompt_ids), "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0, "output_tokens": 0}
        yield _event({"type": "message_start", "message": self._message([], None, None, usage)})
        yield _event({"type": "ping"})
        blocks = _BlockWriter()
        async for e in self.turn.events():
            if not isinstance(e, Done):
                for event in blocks.write(e):
                    yield _event(event)
                continue
            for event in blocks.close():
                yield _event(event)
            if e.finish_reason == "error":
                yield _event({"type": "error", "error": {"type": "api_error", "message":
                              "the engine failed while generating; the request was dropped"}})
                return
            stop_reason, stop_sequence = _stop(e.finish_reason, e.stop_sequence)
            yield _event({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                          "usage": _usage(e.usage)})
            yield _event({"type": "message_stop"})


def _blocks(result: ChatResult) -> list[dict]:
    out = []
    if result.reasoning_content:
        out.append({"type": "thinking", "thinking": result.reasoning_content, "signature": ""})
    if result.content:
        out.append({"type": "text", "text": result.content})
    for call in result.tool_calls:
        out.append({"type": "tool_use", "id": _tool_id(call["id"]), "name": call["function"]["name"],
                    "input": json.loads(call["function"]["arguments"])})
    return out


class _BlockWriter:
    """Parser deltas -> content_block_start / _delta / _stop events, one block per kind of text run."""

    def __init__(self):
        self.index = -1
        self.open: str | None = None

    def _start(self, block: dict) -> list[dict]:
        self.index += 1
        self.open = block["type"]
        return [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def close(self) -> list[dict]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "signature_delta", "signature": ""}})
        events.append({"type": "content_block_stop", "index": self.index})
        self.open = None
        return events

    def write(self, e: Event) -> list[dict]:
        """One chat event -> Anthropic's events (logprobs have no place here)."""
        events = []
        if isinstance(e, ReasoningDelta):
            if self.open != "thinking":
                events += self.close() + self._start({"type": "thinking", "thinking": "", "signature": ""})
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "thinking_delta", "thinking": e.text}})
        elif isinstance(e, TextDelta):
            if self.open != "text":
                events += self.close() + self._start({"type": "text", "text": ""})
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "text_delta", "text": e.text}})
        elif isinstance(e, ToolCallDelta):
            events += self.close() + self._start({"type": "tool_use", "id": _tool_id(e.id), "name": e.name,
                                                  "input": {}})
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "input_json_delta", "partial_json": e.arguments}})
            events += self.close()
        return events

    def delta(self, d: dict) -> list[dict]:
        """A parser delta (`reasoning_content`, `content` or `tool_calls`) -> Anthropic's events."""
        return [x for e in delta_events(0, d) for x in self.write(e)]


def _event(data: dict) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def count_tokens(raw: bytes, make_turn) -> dict:
    """POST /v1/messages/count_tokens: the prompt's token count, as /v1/messages would render it (media
    counted from their headers: nothing is decoded and the vision tower does not run)."""
    chat = await asyncio.to_thread(lambda: make_turn(to_chat(parse_request(raw, count_only=True))))
    return {"input_tokens": await chat.count_tokens()}                # (parsing scales with the body: a thread)
