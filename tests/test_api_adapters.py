"""Anthropic Messages and OpenAI Responses APIs, driven by the official SDKs against a real `qwen36 serve`.

Each API is a translation onto the one chat path: greedy answers equal `LLM.chat` on the same
conversation, prompt token counts equal `LLM.encode_chat` of the equivalent chat messages.
"""
from __future__ import annotations

import json

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
    return LLM(server["path"])


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
