"""OpenAI's Responses API on the one chat path: `POST /v1/responses` (what Codex CLI speaks).

Only translation lives here. `instructions` + `input` (a string, or items: messages with `input_text` /
`input_image` parts, `function_call`, `function_call_output`, `reasoning`) become chat messages; function
tools, also those grouped in `namespace` tools (`namespaces`), and `tool_choice` map over (other tool types,
e.g. Codex's `web_search`, are skipped with a warning); `reasoning.effort` is chat's `reasoning_effort`
(protocol.EFFORTS: "none" / "minimal" turn thinking off, "low" / "medium" cap the reasoning, higher efforts
leave it to the model); `max_output_tokens` is `max_tokens`. The chat turn's answer comes back as output
items (`reasoning`, `message`, `function_call`) with usage (reasoning tokens as the engine counted them), or
as the event stream the SDK consumes.
Responses with `store` (the default) are kept in an in-memory LRU bounded by count and by bytes so that
`previous_response_id` continues them; images are not kept (a text marker stands in their place), so a
continued conversation keeps its text, and one request's media cannot fill the server's memory.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ..parsers import ChatResult
from .chat import ChatTurn, Done, Event, ReasoningDelta, TextDelta, ToolCallDelta, Usage, delta_events, tool_call_dict
from .protocol import APIError, ChatCompletionRequest, effort_thinking, function_tool, validate

log = logging.getLogger("qwen36.server")

# fields that would change the answer and are not implemented: a 400 naming them
_UNSUPPORTED = {"background": "background responses are not supported", "conversation": "conversations are not "
                "supported; use previous_response_id", "prompt": "stored prompts are not supported"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")     # include, prompt_cache_key, truncation, ...: accepted, ignored
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


def parse_request(raw: bytes) -> ResponsesRequest:
    req = validate(ResponsesRequest, raw)
    for name, why in _UNSUPPORTED.items():
        if (req.model_extra or {}).get(name) not in (None, False):
            raise APIError(f"unsupported field {name!r}: {why}", param=name)
    return req


MEDIA_MARKER = "[image omitted from the stored conversation]"
_MEDIA_PARTS = ("image_url", "input_image", "video_url", "input_video", "input_audio", "file", "input_file")


def without_media(messages: list[dict]) -> list[dict]:
    """The conversation as stored: every media part (its data URL is the bulk of a request) replaced by a text
    part saying so. Messages without media are kept as they are (not copied)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in _MEDIA_PARTS for p in content):
            m = {**m, "content": [{"type": "text", "text": MEDIA_MARKER}
                                  if isinstance(p, dict) and p.get("type") in _MEDIA_PARTS else p for p in content]}
        out.append(m)
    return out


def _footprint(value) -> int:
    """Bytes a stored conversation holds (sys.getsizeof of every object in it; shared objects counted each
    time, so the store errs on the small side). Iterative: any nesting."""
    total, stack = 0, [value]
    while stack:
        value = stack.pop()
        total += sys.getsizeof(value)
        if isinstance(value, dict):
            stack += value.keys()
            stack += value.values()
        elif isinstance(value, list):
            stack += value
    return total


class ResponseStore:
    """Finished responses by id (least recently used dropped first): the conversation so far, as chat
    messages without media (`without_media`), for `previous_response_id`. Bounded by `size` responses and
    `max_bytes` in all (`_footprint`); a conversation larger than `max_bytes` alone is not stored."""

    def __init__(self, size: int = 256, max_bytes: int = 64 << 20):
        self.size, self.max_bytes = size, max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[list[dict], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> list[dict]:
        if response_id not in self._items:
            raise APIError(f"previous_response_id {response_id!r} is not known here (not stored, or evicted)",
                           param="previous_response_id")
        self._items.move_to_end(response_id)
        return self._items[response_id][0]

    def put(self, response_id: str, messages: list[dict]) -> None:
        messages = without_media(messages)
        size = _footprint(messages)
        if response_id in self._items:
            self.bytes -= self._items.pop(response_id)[1]
        if size > self.max_bytes:
            log.warning("/v1/responses: %s not stored: its conversation holds %d bytes, above the store's %d",
                        response_id, size, self.max_bytes)
            return
        self._items[response_id] = (messages, size)
        self.bytes += size
        while len(self._items) > self.size or self.bytes > self.max_bytes:
            self.bytes -= self._items.popitem(last=False)[1][1]


# ---- request -> chat request -----------------------------------------------------------------------------

def _parts(content, where: str) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{where}: expected a string or a list of content parts", param="input")
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "refusal"):
            text = p.get("text", p.get("refusal"))
            if not isinstance(text, str):
                raise APIError(f"{where}[{j}].text: expected a string", param="input")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = p.get("image_url")
            if not isinstance(url, str):
                raise APIError(f"{where}[{j}].image_url: expected a URL string (file_id is not supported)",
                               param="input")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise APIError(f"{where}[{j}]: unsupported content part type {kind!r}", param="input")
    return parts


def _text(parts) -> str:
    return parts if isinstance(parts, str) else "".join(p.get("text", "") for p in parts)


def input_messages(req: ResponsesRequest) -> list[dict]:
    """The request's own input as chat messages (instructions not included). Consecutive reasoning,
    assistant message and function_call items form one assistant turn."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    seen = {v: k for k, v in namespaces(req.tools).items()}
    out: list[dict] = []
    turn: dict | None = None                      # the assistant turn being assembled

    def assistant() -> dict:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            out.append(turn)
        return turn

    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(f"{where}: expected an object", param="input")
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") == "assistant":
            assistant()["content"] += _text(_parts(item.get("content", ""), f"{where}.content"))
        elif kind == "message":
            if item.get("role") not in ("user", "system", "developer"):
                raise APIError(f"{where}.role: expected user, assistant, system or developer", param="input")
            out.append({"role": item["role"], "content": _parts(item.get("content", ""), f"{where}.content")})
            turn = None
        elif kind == "reasoning":
            texts = [_reasoning_text(item, "content", where), _reasoning_text(item, "summary", where)]
            msg = assistant()
            msg["reasoning_content"] = msg.get("reasoning_content", "") + (texts[0] or texts[1])
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise APIError(f"{where}.name: required", param="input")
            name = item["name"]
            if isinstance(item.get("namespace"), str):  # a namespaced tool's call: the name the model sees
                name = seen.get((item["namespace"], name), f"{item['namespace']}.{name}")
            arguments = item.get("arguments") or "{}"
            if not isinstance(arguments, str):
                raise APIError(f"{where}.arguments: expected a JSON string", param="input")
            assistant().setdefault("tool_calls", []).append({
                "id": str(item.get("call_id", "")), "type": "function",
                "function": {"name": name, "arguments": arguments}})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                        "content": _parts(item.get("output", ""), f"{where}.output")})
            turn = None
        else:                                    # custom / local_shell / web_search calls of skipped tools
            log.warning("/v1/responses: skipping %s of type %r", where, kind)
    return out


def _reasoning_text(item: dict, key: str, where: str) -> str:
    """The text of a reasoning item's `content` or `summary` (lists of parts with `text`)."""
    parts = item.get(key) or []
    if not isinstance(parts, list):
        raise APIError(f"{where}.{key}: expected a list of parts", param="input")
    texts = [p.get("text", "") for p in parts if isinstance(p, dict)]
    if not all(isinstance(t, str) for t in texts):
        raise APIError(f"{where}.{key}: a part's text must be a string", param="input")
    return "".join(texts)


def namespaces(tools: list[dict] | None) -> dict[str, tuple[str, str]]:
    """Function tools inside `namespace` tools (Codex groups its sub-agent tools so) are served as plain
    tools: {the name the model sees: (namespace, function name)}. The model sees the function's own name,
    or `namespace.name` where two namespaces (or a top-level tool) share it; its calls come back as
    function_call items with `namespace` set, and such items in the input are read back the same way."""
    found = [(t["name"], f["name"]) for t in tools or () if isinstance(t, dict) and t.get("type") == "namespace"
             and isinstance(t.get("name"), str) and isinstance(t.get("tools"), list)
             for f in t["tools"]
             if isinstance(f, dict) and f.get("type") == "function" and isinstance(f.get("name"), str)]
    top = [t.get("name") for t in tools or () if isinstance(t, dict) and t.get("type") == "function"]
    names = top + [name for _, name in found]
    return {(name if names.count(name) == 1 else f"{ns}.{name}"): (ns, name) for ns, name in found}


def _tools(tools: list[dict] | None, spaces: dict[str, tuple[str, str]]) -> list[dict] | None:
    out = []
    seen = {v: k for k, v in spaces.items()}
    for i, t in enumerate(tools or ()):
        if not isinstance(t, dict):
            raise APIError(f"tools[{i}]: expected an object", param="tools")
        kind = t.get("type")
        if kind == "namespace" and isinstance(t.get("tools"), list):
            for j, f in enumerate(t["tools"]):
                key = (t.get("name"), f.get("name") if isinstance(f, dict) else None)
                if not all(isinstance(k, str) for k in key) or key not in seen:
                    log.warning("/v1/responses: skipping tools[%d].tools[%d] (only function tools are served)", i, j)
                    continue
                out.append(function_tool(i, seen[key], f.get("description"), f.get("parameters"), f.get("strict")))
            continue
        if kind != "function":
            log.warning("/v1/responses: skipping tools[%d] of type %r (only function tools are served)", i, kind)
            continue
        out.append(function_tool(i, t.get("name"), t.get("description"), t.get("parameters"), t.get("strict")))
    return out or None


def to_chat(req: ResponsesRequest, history: list[dict]) -> tuple[ChatCompletionRequest, list[dict]]:
    """(the chat request, the conversation without instructions: what a stored response continues)."""
    conversation = history + input_messages(req)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    body: dict = {"messages": messages, "stream": req.stream}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    spaces = namespaces(req.tools)
    tools = _tools(req.tools, spaces)
    if tools:
        body["tools"] = tools
        choice = req.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise APIError("tool_choice: expected 'auto', 'none', 'required' or {\"type\": \"function\", "
                               "\"name\": ...}", param="tool_choice")
            choice = {"type": "function", "function": {"name": choice["name"]}}
        if choice is not None:
            body["tool_choice"] = choice
    if req.parallel_tool_calls is False:
        body["parallel_tool_calls"] = False
    effort = (req.reasoning or {}).get("effort")
    if effort is not None:                       # protocol.EFFORTS: thinking on/off and a thinking budget
        effort_thinking(effort, "reasoning.effort")
        body["reasoning_effort"] = effort
    fmt = (req.text or {}).get("format")
    if fmt is not None:                          # Responses' flat form -> chat completions' response_format
        if not isinstance(fmt, dict):
            raise APIError("text.format: expected an object", param="text.format")
        if fmt.get("type") == "json_schema":
            fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        body["response_format"] = fmt
    for name in ("temperature", "top_p"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    try:
        return validate(ChatCompletionRequest, body), conversation
    except APIError as e:                        # the schema, read once as the request validates: in our words
        if e.param != "response_format":
            raise
        raise APIError(e.message.replace("response_format.json_schema", "text.format").replace(
            "response_format", "text.format"), param="text.format") from None


# ---- chat results -> Responses ---------------------------------------------------------------------------

def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesJob:
    """One /v1/responses request: a chat turn inside (`make_turn`: a chat request -> ChatTurn), Responses
    shapes outside."""

    def __init__(self, req: ResponsesRequest, make_turn, store: ResponseStore):
        self.req, self.store = req, store
        history = store.get(req.previous_response_id) if req.previous_response_id else []
        chat_req, self.conversation = to_chat(req, history)
        self.spaces = namespaces(req.tools)
        self.turn: ChatTurn = make_turn(chat_req)
        self.id = _new_id("resp")
        self.created = int(time.time())
        self.seq = 0

    @property
    def started(self) -> bool:
        return self.turn.started

    async def prepare(self) -> None:
        await self.turn.prepare()

    def _response(self, status: str, output: list[dict], usage: dict | None, reason: str | None = None) -> dict:
        req = self.req
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.turn.ctx.config.served_model_name, "output": output, "usage": usage, "error": None,
                "incomplete_details": {"reason": reason} if reason else None, "instructions": req.instructions,
                "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
                "parallel_tool_calls": req.parallel_tool_calls is not False, "temperature": req.temperature,
                "top_p": req.top_p, "max_output_tokens": req.max_output_tokens,
                "previous_response_id": req.previous_response_id, "reasoning": req.reasoning or {},
                "text": {"format": {"type": "text"}}, "store": req.store, "metadata": req.metadata or {},
                "truncation": "disabled"}

    def _remember(self, result: ChatResult) -> None:
        if not self.req.store:
            return
        answer: dict = {"role": "assistant", "content": result.content or ""}
        if result.reasoning_content:
            answer["reasoning_content"] = result.reasoning_content
        if result.tool_calls:
            answer["tool_calls"] = result.tool_calls
        self.store.put(self.id, self.conversation + [answer])

    def _final(self, done: Done, output: list[dict]) -> dict:
        status, reason = ("incomplete", "max_output_tokens") if done.finish_reason == "length" else ("completed", None)
        return self._response(status, output, _usage(done.usage), reason)

    async def complete(self, request: Request) -> dict:
        [a] = await self.turn.answers()
        self._remember(a.result)
        return self._final(a.done, _items(a.result, self.spaces))

    def _event(self, data: dict) -> str:
        data["sequence_number"] = self.seq
        self.seq += 1
        return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def stream(self, request: Request) -> AsyncIterator[str]:
        yield self._event({"type": "response.created", "response": self._response("in_progress", [], None)})
        yield self._event({"type": "response.in_progress", "response": self._response("in_progress", [], None)})
        items = _ItemWriter(self.spaces)
        reasoning, content, calls = [], [], []
        async for e in self.turn.events():
            if not isinstance(e, Done):
                if isinstance(e, ReasoningDelta):
                    reasoning.append(e.text)
                elif isinstance(e, TextDelta):
                    content.append(e.text)
                elif isinstance(e, ToolCallDelta):
                    calls.append(tool_call_dict(e))
                for event in items.write(e):
                    yield self._event(event)
                continue
            for event in items.close():
                yield self._event(event)
            if e.finish_reason == "error":
                failed = self._response("failed", items.done, None)
                failed["error"] = {"code": "server_error",
                                   "message": "the engine failed while generating; the request was dropped"}
                yield self._event({"type": "response.failed", "response": failed})
                return
            self._remember(ChatResult("".join(content) or None, "".join(reasoning) or None, calls))
            final = self._final(e, items.done)
            kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
            yield self._event({"type": kind, "response": final})


def _usage(u: Usage) -> dict:
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens}


def _reasoning_item(text: str, item_id: str | None = None) -> dict:
    return {"type": "reasoning", "id": item_id or _new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id or _new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call: dict, status: str = "completed", spaces: dict | None = None) -> dict:
    name = call["function"]["name"]
    item = {"type": "function_call", "id": _new_id("fc"), "call_id": call["id"], "name": name,
            "arguments": call["function"]["arguments"], "status": status}
    if spaces and name in spaces:                # a function of a namespace tool
        item["namespace"], item["name"] = spaces[name]
    return item


def _items(result: ChatResult, spaces: dict | None = None) -> list[dict]:
    out = []
    if result.reasoning_content:
        out.append(_reasoning_item(result.reasoning_content))
    if result.content:
        out.append(_message_item(result.content))
    out += [_call_item(call, spaces=spaces) for call in result.tool_calls]
    return out


class _ItemWriter:
    """Chat events -> output item events; finished items collect in `done`."""

    def __init__(self, spaces: dict | None = None):
        self.spaces = spaces
        self.done: list[dict] = []
        self.open: dict | None = None
        self.text = ""

    def _index(self) -> int:
        return len(self.done)

    def close(self) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        i, events = self._index(), []
        if item["type"] == "reasoning":
            item = _reasoning_item(self.text, item["id"])
            events.append({"type": "response.reasoning_text.done", "item_id": item["id"], "output_index": i,
                           "content_index": 0, "text": self.text})
        else:
            item = _message_item(self.text, item["id"])
            part = item["content"][0]
            events += [{"type": "response.output_text.done", "item_id": item["id"], "output_index": i,
                        "content_index": 0, "text": self.text, "logprobs": []},
                       {"type": "response.content_part.done", "item_id": item["id"], "output_index": i,
                        "content_index": 0, "part": part}]
        events.append({"type": "response.output_item.done", "output_index": i, "item": item})
        self.done.append(item)
        return events

    def _start(self, kind: str) -> list[dict]:
        events = self.close()
        i = self._index()
        self.text = ""
        if kind == "reasoning":
            self.open = {"type": "reasoning", "id": _new_id("rs"), "summary": [], "content": []}
            return events + [{"type": "response.output_item.added", "output_index": i, "item": self.open}]
        self.open = {"type": "message", "id": _new_id("msg"), "status": "in_progress", "role": "assistant",
                     "content": []}
        return events + [{"type": "response.output_item.added", "output_index": i, "item": self.open},
                         {"type": "response.content_part.added", "item_id": self.open["id"], "output_index": i,
                          "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [],
                                                       "logprobs": []}}]

    def write(self, e: Event) -> list[dict]:
        """One chat event -> Responses' events (logprobs are not reported)."""
        events = []
        if isinstance(e, (ReasoningDelta, TextDelta)):
            kind = "reasoning" if isinstance(e, ReasoningDelta) else "message"
            if self.open is None or self.open["type"] != kind:
                events += self._start(kind)
            self.text += e.text
            name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            event = {"type": name, "item_id": self.open["id"], "output_index": self._index(), "content_index": 0,
                     "delta": e.text}
            if kind == "message":
                event["logprobs"] = []
            events.append(event)
        elif isinstance(e, ToolCallDelta):
            events += self.close()
            i, item = self._index(), _call_item(tool_call_dict(e), "in_progress", self.spaces)
            events.append({"type": "response.output_item.added", "output_index": i,
                           "item": {**item, "arguments": ""}})
            events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": i, "delta": item["arguments"]})
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": i, "arguments": item["arguments"]})
            item["status"] = "completed"
            events.append({"type": "response.output_item.done", "output_index": i, "item": item})
            self.done.append(item)
        return events

    def delta(self, d: dict) -> list[dict]:
        """A parser delta (`reasoning_content`, `content` or `tool_calls`) -> Responses' events."""
        return [x for e in delta_events(0, d) for x in self.write(e)]
