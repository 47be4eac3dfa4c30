"""Anthropic Messages and OpenAI Responses APIs, driven by the official SDKs against a real `qwen36 serve`.

Each API is a translation onto the one chat path: greedy answers equal `LLM.chat` on the same
conversation, prompt token counts equal `LLM.encode_chat` of the equivalent chat messages.
"""
from __future__ import annotations

import json
import re

import anthropic
import httpx
import openai
import pytest
from test_server import KEY, launch, stop

from qwen36 import LLM, SamplingParams

MSG = [{"role": "user", "content": "What is 2+2?"}]
WEATHER = {"name": "get_weather", "description": "Weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("demo")
    log = tmp_path_factory.mktemp("adapters") / "server.log"
    proc, base = launch(path, log, "--api-key", KEY, "--max-model-len", "1024", "--served-model-name", "qwen36-demo")
    yield {"base": base, "path": path, "proc": proc, "log": log}
    stop(proc)


@pytest.fixture(scope="module")
def offline(server):
    return LLM(server["path"], quantization=None)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server["base"], api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, **kw)


# ---- Anthropic Messages ----------------------------------------------------------------------------------

def blocks_of(message) -> dict:
    out = {"thinking": "", "text": "", "tool_use": []}
    for b in message.content:
        if b.type == "thinking":
            out["thinking"] += b.thinking
            assert b.signature == ""
        elif b.type == "text":
            out["text"] += b.text
        else:
            out["tool_use"].append((b.name, b.input))
    return out


@pytest.mark.parametrize("thinking", [None, {"type": "disabled"}])
def test_messages_equal_llm_chat_whole_and_streamed(claude, offline, thinking):
    kw = dict(model="qwen36-demo", max_tokens=12, messages=MSG, extra_body={"temperature": 0},
              **({"thinking": thinking} if thinking else {}))
    whole = claude.messages.create(**kw)
    want = offline.chat(MSG, greedy(12), enable_thinking=thinking is None)
    got = blocks_of(whole)
    assert got["thinking"] == (want.reasoning_content or "") and got["text"] == (want.content or "")
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 12
    assert whole.usage.input_tokens + whole.usage.cache_read_input_tokens == len(
        offline.encode_chat(MSG, enable_thinking=thinking is None).ids)
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert blocks_of(final) == got and final.stop_reason == "max_tokens" and final.usage.output_tokens == 12


def test_messages_tool_round_trip_and_count_tokens(claude, offline):
    """tool_use in the history, tool_result (string and blocks) back: the prompt is LLM.encode_chat of
    the same conversation in OpenAI form, and count_tokens says so before running it."""
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": [
                   {"type": "thinking", "thinking": "Call the tool.", "signature": ""},
                   {"type": "text", "text": "Checking."},
                   {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                   {"type": "text", "text": "And tomorrow?"}]}]
    kw = dict(model="m", messages=history, tools=[WEATHER], system="Be brief.")
    counted = claude.messages.count_tokens(**kw).input_tokens
    r = claude.messages.create(max_tokens=3, extra_body={"temperature": 0}, **kw)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == counted
    chat = [{"role": "system", "content": "Be brief."}, history[0],
            {"role": "assistant", "content": "Checking.", "reasoning_content": "Call the tool.",
             "tool_calls": [{"id": "toolu_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
            {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    assert counted == len(offline.encode_chat(chat, tools=tools).ids)
    want = offline.chat(chat, greedy(3), tools=tools)
    assert blocks_of(r)["thinking"] == (want.reasoning_content or "")


def test_messages_stop_sequence(claude):
    kw = dict(model="m", max_tokens=16, messages=MSG, extra_body={"temperature": 0}, thinking={"type": "disabled"})
    text = blocks_of(claude.messages.create(**kw))["text"]
    stop = text[3:6]
    r = claude.messages.create(stop_sequences=["zzzz-never", stop], **kw)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert blocks_of(r)["text"] == text[:text.find(stop)].strip()


def test_messages_auth_and_errors(server, claude):
    bad = anthropic.Anthropic(base_url=server["base"], api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="m", max_tokens=2, messages=MSG)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "data": "x"}}]}])
    assert "document" in str(e.value)
    r = httpx.post(server["base"] + "/v1/messages", headers={"x-api-key": KEY},
                   json={"model": "m", "messages": MSG})               # max_tokens is required
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": r.json()["error"]["message"]}}
    assert "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(server["base"] + "/v1/messages", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "m", "max_tokens": 2, "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "messages[0].role" in r.json()["error"]["message"]


def test_messages_event_sequence(server):
    with httpx.stream("POST", server["base"] + "/v1/messages", headers={"x-api-key": KEY}, timeout=60,
                      json={"model": "m", "max_tokens": 6, "messages": MSG, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    body = kinds[2:-2]
    assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
    assert set(body) <= {"content_block_start", "content_block_delta", "content_block_stop"}
    assert events[-2]["usage"]["output_tokens"] == 6 and events[-2]["delta"]["stop_reason"] == "max_tokens"


def test_block_events_assemble_in_the_sdk():
    """The event writer's output for reasoning, text and two tool calls, fed to the anthropic SDK's own
    stream accumulator: the final message has each block whole."""
    from anthropic.lib.streaming._messages import accumulate_event

    from qwen36.server.anthropic import _BlockWriter

    deltas = [{"reasoning_content": "Think"}, {"reasoning_content": "ing."}, {"content": "Calling."},
              {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
              {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}]
    w = _BlockWriter()
    events = [{"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 0}}}]
    for d in deltas:
        events += w.delta(d)
    events += w.close()
    events.append({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                   "usage": {"output_tokens": 9}})
    snapshot, bufs = None, {}
    for e in events:
        snapshot = accumulate_event(event=e, current_snapshot=snapshot, json_bufs=bufs)
    assert [b.type for b in snapshot.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert snapshot.content[0].thinking == "Thinking." and snapshot.content[1].text == "Calling."
    assert [b.input for b in snapshot.content[2:]] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert snapshot.content[2].id == "toolu_a" and snapshot.stop_reason == "tool_use"


# ---- OpenAI Responses ------------------------------------------------------------------------------------

def items_of(response) -> dict:
    out = {"reasoning": "", "text": "", "calls": []}
    for item in response.output:
        if item.type == "reasoning":
            out["reasoning"] += "".join(c.text for c in item.content or ())
        elif item.type == "message":
            out["text"] += "".join(c.text for c in item.content)
        elif item.type == "function_call":
            out["calls"].append((item.name, json.loads(item.arguments)))
    return out


@pytest.mark.parametrize("effort", [None, "none"])
def test_responses_equal_llm_chat_whole_and_streamed(oai, offline, effort):
    kw = dict(model="qwen36-demo", input="What is 2+2?", max_output_tokens=12, temperature=0, store=False,
              **({"reasoning": {"effort": effort}} if effort else {}))
    whole = oai.responses.create(**kw)
    want = offline.chat(MSG, greedy(12), enable_thinking=effort is None)
    assert items_of(whole) == {"reasoning": want.reasoning_content or "", "text": want.content or "", "calls": []}
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.output_tokens == 12
    assert whole.usage.input_tokens == len(offline.encode_chat(MSG, enable_thinking=effort is None).ids)
    # the SDK's stream helper: a response cut at max_output_tokens ends with response.incomplete (its
    # get_final_response() wants response.completed, so the terminal event is read here)
    with oai.responses.stream(**kw) as stream:
        final = [e.response for e in stream if e.type in ("response.completed", "response.incomplete")][-1]
    assert items_of(final) == items_of(whole) and final.usage.output_tokens == 12 and final.status == "incomplete"


def test_responses_function_call_output_and_previous_response_id(oai, offline):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather for a city.",
              "parameters": WEATHER["input_schema"]},
             {"type": "local_shell"}]                                  # skipped (logged), not a 400
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    first = oai.responses.create(model="m", input=items, tools=tools, instructions="Be brief.",
                                 max_output_tokens=3, temperature=0)
    chat_tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                                    "parameters": WEATHER["input_schema"]}}]
    chat = [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    system = [{"role": "system", "content": "Be brief."}]
    assert first.usage.input_tokens == len(offline.encode_chat(system + chat, tools=chat_tools).ids)
    # the next turn continues the stored one (instructions are per request)
    answer = offline.chat(system + chat, greedy(3), tools=chat_tools)
    second = oai.responses.create(model="m", previous_response_id=first.id, input="Thanks!", tools=tools,
                                  max_output_tokens=2, temperature=0)
    turn = {"role": "assistant", "content": answer.content or ""}
    if answer.reasoning_content:
        turn["reasoning_content"] = answer.reasoning_content
    assert second.usage.input_tokens == len(offline.encode_chat(
        chat + [turn, {"role": "user", "content": "Thanks!"}], tools=chat_tools).ids)
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="m", previous_response_id="resp_unknown", input="x", max_output_tokens=2)
    assert "previous_response_id" in str(e.value)


def test_responses_errors(server, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="m", input="x", text={"format": {"type": "yaml"}})
    assert "text.format" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model="m", input=[{"type": "message", "role": "user",
                                                "content": [{"type": "input_file", "file_id": "f"}]}])
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model="m", input="x", background=True)
    assert server["proc"].poll() is None


def test_responses_event_sequence(server):
    with httpx.stream("POST", server["base"] + "/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60, json={"model": "m", "input": "Hi", "max_output_tokens": 6, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert kinds[2] == "response.output_item.added" and kinds[-2] == "response.output_item.done"
    assert events[-1]["response"]["usage"]["output_tokens"] == 6


def test_item_events_assemble_in_the_sdk():
    """The item writer's events for reasoning, text and a function call, through the openai SDK's own
    Responses stream accumulator."""
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent
    from openai._models import construct_type_unchecked

    from qwen36.server.responses import _ItemWriter

    w = _ItemWriter()
    base = {"id": "resp_1", "object": "response", "created_at": 0, "status": "in_progress", "model": "m",
            "output": [], "tools": [], "tool_choice": "auto", "parallel_tool_calls": True}
    events = [{"type": "response.created", "response": base}]
    for d in [{"reasoning_content": "Hm."}, {"content": "Calling"}, {"content": " now."},
              {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]:
        events += w.delta(d)
    events += w.close()
    events.append({"type": "response.completed", "response": {**base, "status": "completed", "output": w.done}})
    state = ResponseStreamState(input_tools=[], text_format=openai.NOT_GIVEN)
    for n, e in enumerate(events):
        state.handle_event(construct_type_unchecked(type_=ResponseStreamEvent, value={**e, "sequence_number": n}))
    final = state._completed_response
    assert items_of(final) == {"reasoning": "Hm.", "text": "Calling now.", "calls": [("get_weather", {"city": "Oslo"})]}
    assert final.output[2].call_id == "call_a"


def test_adapter_server_log_has_no_tracebacks(server):
    assert "Traceback" not in server["log"].read_text()


def test_malformed_adapter_requests_disturb_nothing(server, claude):
    """Bad bodies on both adapters while a good streamed answer is in flight: 4xx naming the problem, and
    the good answer is the same as when run alone."""
    import threading

    kw = dict(model="m", max_tokens=20, messages=MSG, extra_body={"temperature": 0})
    result = {}

    def good():
        with claude.messages.stream(**kw) as s:
            result["msg"] = blocks_of(s.get_final_message())
    t = threading.Thread(target=good)
    t.start()
    bad = [("/v1/messages", {"model": "m", "max_tokens": 2, "messages": "hi"}, "messages"),
           ("/v1/messages", {"model": "m", "max_tokens": 2, "messages": MSG, "tool_choice": {"type": "weird"}},
            "tool_choice"),
           ("/v1/responses", {"model": "m", "input": [{"type": "message", "role": "robot", "content": "x"}]}, "role"),
           ("/v1/responses", {"model": "m", "input": "x", "tool_choice": {"type": "mcp"},
                              "tools": [{"type": "function", "name": "f"}]}, "tool_choice")]
    for route, body, needle in bad * 2:
        r = httpx.post(server["base"] + route, headers={"x-api-key": KEY}, json=body, timeout=60)
        assert 400 <= r.status_code < 500 and needle in r.text, r.text
    t.join()
    assert result["msg"] == blocks_of(claude.messages.create(**kw))


STRICT_WEATHER = {**WEATHER, "input_schema": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["city", "days"], "additionalProperties": False}}


@pytest.mark.parametrize("stream", [False, True])
def test_messages_tool_use_round_trip(claude, stream):
    """tool_choice forces a call (constrained to the schema, so random weights make one): a tool_use
    block with a schema-valid input, stop_reason tool_use; its tool_result goes back and is answered."""
    import jsonschema

    kw = dict(model="m", max_tokens=80, tools=[STRICT_WEATHER],
              tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
              thinking={"type": "disabled"}, messages=[{"role": "user", "content": "Weather in Oslo?"}],
              extra_body={"temperature": 0.9, "top_k": 50})
    if stream:
        with claude.messages.stream(**kw) as s:
            first = s.get_final_message()
    else:
        first = claude.messages.create(**kw)
    [use] = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, STRICT_WEATHER["input_schema"])
    history = kw["messages"] + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                              "content": "sunny, 21 C"}]}]
    second = claude.messages.create(model="m", max_tokens=4, tools=[STRICT_WEATHER], messages=history,
                                    thinking={"type": "disabled"})
    assert second.stop_reason in ("max_tokens", "end_turn", "tool_use")


def test_responses_function_call_round_trip(oai):
    import jsonschema

    tools = [{"type": "function", "name": "get_weather", "description": "Weather for a city.",
              "parameters": STRICT_WEATHER["input_schema"], "strict": True}]
    first = oai.responses.create(model="m", input="Weather in Oslo?", tools=tools, max_output_tokens=80,
                                 tool_choice={"type": "function", "name": "get_weather"}, temperature=0.9,
                                 reasoning={"effort": "none"}, parallel_tool_calls=False)
    [call] = [i for i in first.output if i.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), STRICT_WEATHER["input_schema"])
    second = oai.responses.create(model="m", previous_response_id=first.id, tools=tools, max_output_tokens=3,
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
                                  reasoning={"effort": "none"})
    assert second.status in ("completed", "incomplete") and second.usage.input_tokens > first.usage.input_tokens


def test_strict_flag_of_adapter_tools_reaches_the_chat_request():
    """`strict: true` on a Responses or Anthropic tool keeps its meaning: the chat request's tool is strict
    (its calls constrained), and a tool without the flag is not."""
    from qwen36.server import anthropic as am, responses as rm

    schema = WEATHER["input_schema"]
    r = rm.parse_request(json.dumps({"input": "x", "tools": [
        {"type": "function", "name": "a", "parameters": schema, "strict": True},
        {"type": "function", "name": "b", "parameters": schema}]}).encode())
    chat, _ = rm.to_chat(r, [])
    assert [t.function.strict for t in chat.tools] == [True, None]
    m = am.parse_request(json.dumps({"max_tokens": 2, "messages": MSG, "tools": [
        {**WEATHER, "strict": True}, {**WEATHER, "name": "other"}]}).encode())
    assert [t.function.strict for t in am.to_chat(m).tools] == [True, None]


# ---- the real clients' requests (tests/data/agent_requests, captured by tests/test_agent_clients.py) -------

AGENT_REQUESTS = __import__("pathlib").Path(__file__).parent / "data" / "agent_requests"


def agent_request(name: str) -> dict:
    return json.loads((AGENT_REQUESTS / f"{name}.json").read_text())


def rendered(chat, thinking: bool = True) -> str:
    """The prompt the server renders for a translated request (late system/developer messages merged)."""
    from qwen36.chat import merge_system_messages, render_chat

    messages = merge_system_messages([m.model_dump(exclude_none=True) for m in chat.messages])
    tools = [t.model_dump(exclude_none=True) for t in chat.tools or ()]
    return render_chat(messages, tools=tools or None, enable_thinking=thinking)


@pytest.mark.parametrize("name", ["claude_code_first", "claude_code_tool_result", "claude_code_second_turn"])
def test_claude_code_requests_translate(name):
    """What Claude Code sends -- a system message inside `messages`, adaptive thinking with display omitted,
    output_config.effort, context_management, a defer_loading placeholder tool, cache_control marks -- is
    accepted, and renders as one leading system message, its tools, and the thinking prompt."""
    from qwen36.server import anthropic as am

    fixture = agent_request(name)
    assert fixture["path"].startswith("/v1/messages")
    body = fixture["body"]
    req = am.parse_request(json.dumps(body).encode())
    chat = am.to_chat(req)
    assert body["thinking"]["type"] == "adaptive" and chat.chat_template_kwargs == {"enable_thinking": True}
    effort = body.get("output_config", {}).get("effort")
    assert chat.thinking_token_budget == {"low": 1024, "medium": 8192}.get(effort)
    assert chat.max_tokens == body["max_tokens"] and chat.stream is True
    served = [t["name"] for t in body["tools"] if not t.get("defer_loading") and t.get("type") in (None, "custom")]
    assert [t.function.name for t in chat.tools] == served and "DeferredToolPlaceholder" not in served
    late = [m for m in body["messages"] if m["role"] == "system"]
    assert late and [m.role for m in chat.messages].count("system") == 1 + len(late)
    prompt = rendered(chat)
    environment = am._text_of(late[0]["content"], "x")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert prompt.count("<|im_start|>system") == 1
    assert prompt.index(environment.strip()) < prompt.index("<|im_start|>user")     # in the leading system message
    if name != "claude_code_first":               # the Read call and its result (our scripted file)
        [call] = [c for m in chat.messages if m.role == "assistant" for c in m.tool_calls or ()]
        assert call.function.name == "Read" and json.loads(call.function.arguments)["file_path"].endswith("hello.txt")
        [result] = [m for m in chat.messages if m.role == "tool"]
        assert "qwen36-file-marker-5521" in result.content and result.tool_call_id == call.id
    if name == "claude_code_second_turn":         # our answer, sent back: its reasoning and text
        answer = [m for m in chat.messages if m.role == "assistant"][-1]
        assert (answer.reasoning_content, answer.content) == ("Okay.", "Hi there!")


@pytest.mark.parametrize("name", ["codex_first", "codex_tool_result", "codex_second_turn"])
def test_codex_requests_translate(name):
    """What Codex sends -- developer messages, function tools and a `namespace` of sub-agent tools, web_search,
    store false, include, client_metadata, prompt_cache_key -- is accepted: function tools (the namespace's
    flattened) reach the prompt, and reasoning / function_call / function_call_output items come back as
    the assistant turn and tool message they were."""
    from qwen36.server import responses as rm

    fixture = agent_request(name)
    assert fixture["path"] == "/v1/responses"
    body = fixture["body"]
    req = rm.parse_request(json.dumps(body).encode())
    chat, conversation = rm.to_chat(req, [])
    assert chat.stream is True and req.store is False and chat.max_tokens == body.get("max_output_tokens")
    want = [t["name"] for t in body["tools"] if t["type"] == "function"]
    want += [f["name"] for t in body["tools"] if t["type"] == "namespace" for f in t["tools"]]
    assert sorted(t.function.name for t in chat.tools) == sorted(want)
    spaces = rm.namespaces(req.tools)
    assert {ns for ns, _ in spaces.values()} == {t["name"] for t in body["tools"] if t["type"] == "namespace"}
    prompt = rendered(chat)
    assert prompt.count("<|im_start|>system") == 1 and prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert "You are a coding agent running in the Codex CLI" in prompt.split("<|im_start|>user")[0]
    if name != "codex_first":
        [call] = [c for m in chat.messages if m.role == "assistant" for c in m.tool_calls or ()]
        assert (call.id, call.function.name) == ("call_cat1", "exec_command")
        [result] = [m for m in chat.messages if m.role == "tool"]
        assert "qwen36-file-marker-5521" in json.dumps(result.content) and result.tool_call_id == "call_cat1"
    if name == "codex_second_turn":
        answer = [m for m in chat.messages if m.role == "assistant"][-1]
        assert (answer.reasoning_content, answer.content) == ("Okay.", "Hi there!")


def chat_job(body: dict, defaults: dict | None = None):
    """The chat turn of a parsed /v1/chat/completions body, without an engine (thinking and constraints only)."""
    from types import SimpleNamespace

    from qwen36.server.chat import ChatTurn
    from qwen36.server.config import ServerConfig
    from qwen36.server.openai import to_call
    from qwen36.server.protocol import ChatCompletionRequest, parse

    req = parse(ChatCompletionRequest, json.dumps({"messages": MSG, **body}).encode())
    ctx = SimpleNamespace(config=ServerConfig("m", default_chat_template_kwargs=defaults), grammar=None,
                          runner=SimpleNamespace(), vocab_size=1000)
    turn = ChatTurn(to_call(req, ctx.vocab_size), ctx)
    turn.req = req
    return turn


@pytest.mark.parametrize("body, thinking, budget", [
    ({"reasoning_effort": "none"}, False, None), ({"reasoning_effort": "minimal"}, False, None),
    ({"reasoning_effort": "low"}, True, 1024), ({"reasoning_effort": "medium"}, True, 8192),
    ({"reasoning_effort": "high"}, True, None), ({"reasoning_effort": "xhigh"}, True, None),
    # what the request says explicitly wins over the effort
    ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}, False, None),
    ({"reasoning_effort": "low", "thinking_token_budget": 7}, True, 7),
    ({}, True, None),
])
def test_reasoning_effort_sets_thinking_and_budget(body, thinking, budget):
    job = chat_job(body)
    assert job.thinking is thinking
    assert job.constraint().get("thinking_token_budget") == budget


def test_reasoning_effort_overrides_server_default():
    assert chat_job({"reasoning_effort": "low"}, {"enable_thinking": False}).thinking is True
    assert chat_job({}, {"enable_thinking": False}).thinking is False


@pytest.mark.parametrize("body, param", [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"), ({"n_probs": 5}, "n_probs"),
    ({"mirostat": 2}, "mirostat"), ({"typical_p": 0.5}, "typical_p"),
])
def test_output_changing_fields_of_other_dialects_are_400s(body, param):
    from qwen36.server.protocol import APIError

    with pytest.raises(APIError) as e:
        chat_job(body)
    assert e.value.param == param and e.value.status == 400


def test_no_op_fields_of_other_dialects_are_accepted(caplog):
    """llama.cpp's and vLLM's fields that cannot change the output are accepted, and logged at debug."""
    body = {"cache_prompt": True, "slot_id": 1, "id_slot": 0, "timings_per_token": True, "return_progress": True,
            "n_probs": 0, "priority": 3, "cache_salt": "s", "request_id": "r"}
    with caplog.at_level("DEBUG", logger="qwen36.server"):
        job = chat_job(body)
    assert job.req.messages[0].content == MSG[0]["content"]
    assert "cache_prompt" in caplog.text and "n_probs" in caplog.text


def anthropic_chat(**body):
    from qwen36.server import anthropic as am

    return am.to_chat(am.parse_request(json.dumps({"max_tokens": 8, "messages": MSG, **body}).encode()))


@pytest.mark.parametrize("body, thinking, budget", [
    ({"output_config": {"effort": "low"}}, None, 1024),
    ({"output_config": {"effort": "medium"}, "thinking": {"type": "adaptive"}}, True, 8192),
    ({"output_config": {"effort": "high"}, "thinking": {"type": "adaptive", "display": "omitted"}}, True, None),
    ({"output_config": {"effort": "max"}, "thinking": {"type": "enabled", "budget_tokens": 50}}, True, 50),
    ({"output_config": {"effort": "low"}, "thinking": {"type": "enabled", "budget_tokens": 50}}, True, 50),
    ({"output_config": {"effort": "low"}, "thinking": {"type": "disabled"}}, False, None),
    ({"output_config": {"effort": "none"}}, False, None),
    ({"context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}}, None, None),
])
def test_messages_effort_and_thinking(body, thinking, budget):
    """output_config.effort is the thinking budget (as reasoning_effort's), under an explicit budget_tokens;
    it does not turn thinking on by itself; context_management and thinking.display change nothing."""
    chat = anthropic_chat(**body)
    assert (chat.chat_template_kwargs or {}).get("enable_thinking") == thinking
    assert chat.thinking_token_budget == budget


@pytest.mark.parametrize("body, param", [
    ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
    ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
    ({"thinking": {"type": "sometimes"}}, "thinking"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
])
def test_messages_fields_that_would_change_the_answer_are_400s(body, param):
    from qwen36.server.protocol import APIError

    with pytest.raises(APIError) as e:
        anthropic_chat(**body)
    assert e.value.param == param


def test_messages_system_messages_inside_messages_are_merged_in_order():
    """Claude Code sends its environment as a `system` message after the first user turn: it joins the
    leading system message, as late system messages do on /v1/chat/completions."""
    chat = anthropic_chat(system="Be terse.", messages=[
        {"role": "user", "content": "hi"}, {"role": "system", "content": [{"type": "text", "text": "Env: linux"}]},
        {"role": "assistant", "content": "hello"}, {"role": "system", "content": "Reminder."},
        {"role": "user", "content": "go"}])
    prompt = rendered(chat)
    assert prompt.startswith("<|im_start|>system\nBe terse.\n\nEnv: linux\n\nReminder.<|im_end|>\n<|im_start|>user\nhi")


def test_messages_deferred_tools_load_by_tool_reference():
    """A defer_loading tool stays out of the prompt until a tool_result's tool_reference block loads it."""
    weather = {**WEATHER, "defer_loading": True}
    search = {"name": "ToolSearch", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}
    assert [t.function.name for t in anthropic_chat(tools=[search, weather]).tools] == ["ToolSearch"]
    messages = MSG + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ToolSearch",
                                           "input": {"query": "weather"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "tool_reference", "tool_name": "get_weather"}]}]}]
    chat = anthropic_chat(tools=[search, weather], messages=messages)
    assert [t.function.name for t in chat.tools] == ["ToolSearch", "get_weather"]
    assert chat.messages[-1].role == "tool" and "get_weather" in json.dumps(chat.messages[-1].content)
    from qwen36.server.protocol import APIError

    with pytest.raises(APIError, match="tool_reference"):
        anthropic_chat(tools=[search], messages=messages)


def test_responses_namespace_tools_are_served_and_calls_name_their_namespace():
    """Codex groups its sub-agent tools in a `namespace` tool: each function is a tool of the prompt (the
    name qualified only where names clash), a call of one comes back with `namespace` set, and such a call
    in the input is read back under the name the model saw."""
    from qwen36.parsers import ChatResult
    from qwen36.server import responses as rm

    fn = {"type": "function", "parameters": {"type": "object", "properties": {}}}
    tools = [{**fn, "name": "close"}, {"type": "namespace", "name": "agents", "description": "Sub-agents.",
                                       "tools": [{**fn, "name": "spawn"}, {**fn, "name": "close"}]},
             {"type": "web_search"}]
    call = {"type": "function_call", "name": "spawn", "namespace": "agents", "call_id": "c1", "arguments": "{}"}
    req = rm.parse_request(json.dumps({"input": [{"role": "user", "content": "x"}, call], "tools": tools}).encode())
    chat, _ = rm.to_chat(req, [])
    assert [t.function.name for t in chat.tools] == ["close", "spawn", "agents.close"]
    assert chat.messages[-1].tool_calls[0].function.name == "spawn"
    spaces = rm.namespaces(req.tools)
    calls = [{"id": "c2", "type": "function", "function": {"name": n, "arguments": "{}"}}
             for n in ("agents.close", "close", "spawn")]
    items = rm._items(ChatResult(None, None, calls), spaces)
    assert [(i["name"], i.get("namespace")) for i in items] == [("close", "agents"), ("close", None),
                                                                ("spawn", "agents")]
    w = rm._ItemWriter(spaces)
    w.delta({"tool_calls": calls[:1]})
    assert (w.done[0]["name"], w.done[0]["namespace"]) == ("close", "agents")


def test_chat_reasoning_effort_none_is_thinking_off(oai, offline):
    """reasoning_effort "none" on /v1/chat/completions answers as enable_thinking false does."""
    r = oai.chat.completions.create(model="m", messages=MSG, max_tokens=8, temperature=0, reasoning_effort="none")
    want = offline.chat(MSG, greedy(8), enable_thinking=False)
    assert r.choices[0].message.content == want.content
    assert r.usage.prompt_tokens == len(offline.encode_chat(MSG, enable_thinking=False).ids)


def test_a_prompt_longer_than_the_context_is_worded_as_each_api_words_it(claude, oai):
    """Agent clients compact their history when told the prompt is too long, in their API's words: OpenAI's
    code context_length_exceeded, Anthropic's 'prompt is too long: N tokens > M maximum'."""
    long = [{"role": "user", "content": "word " * 1500}]
    with pytest.raises(anthropic.BadRequestError) as a:
        claude.messages.create(model="qwen36-demo", max_tokens=8, messages=long)
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 1024 maximum", a.value.body["error"]["message"])
    with pytest.raises(openai.BadRequestError) as o:
        oai.chat.completions.create(model="qwen36-demo", max_tokens=8, messages=long)
    assert o.value.code == "context_length_exceeded" and "maximum context length is 1024" in o.value.message
