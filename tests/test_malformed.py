"""Malformed and oversized requests are 4xx errors naming the field, never another exception (a 5xx).

Unit level: the parse functions each route calls (protocol.parse, anthropic.parse_request,
responses.parse_request and the adapters' to_chat), the schema checks behind strict tools
(structured.tool_call_grammar, parsers.schema_types), the tokenizer's content escaping, the request-size
bounds and the /v1/responses store. The first tests replay the security audit's twelve 5xx inputs.
"""
from __future__ import annotations

import asyncio
import copy
import json

import pytest

from qwen36.parsers import parse_assistant, schema_types
from qwen36.server import anthropic, protocol, responses
from qwen36.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from qwen36.structured import GrammarError, json_grammar, tool_call_grammar
from qwen36.tokenizer import SPECIAL_TOKENS, ContentEscape

USER = [{"role": "user", "content": "hi"}]


def chat(body: dict):
    return protocol.parse(ChatCompletionRequest, json.dumps({"messages": USER, **body}).encode())


def completion(body: dict):
    return protocol.parse(CompletionRequest, json.dumps({"prompt": "hi", **body}).encode())


def messages(body: dict, count_only: bool = False):
    req = anthropic.parse_request(json.dumps({"max_tokens": 8, "messages": USER, **body}).encode(), count_only)
    return anthropic.to_chat(req)


def respond(body: dict):
    return responses.to_chat(responses.parse_request(json.dumps({"input": "hi", **body}).encode()), [])


def rejects(call, param: str, *words: str) -> APIError:
    """`call` raises an APIError with a 4xx status naming `param` (and mentioning `words`)."""
    with pytest.raises(APIError) as info:
        call()
    e = info.value
    assert 400 <= e.status < 500 and e.param == param, (e.status, e.param, e.message)
    assert all(w in e.message for w in words), e.message
    return e


def nested(depth: int, leaf='"x"') -> str:
    return "[" * depth + leaf + "]" * depth


# ---- the audit's twelve 5xx inputs ----------------------------------------------------------------------

ROUTES = {   # route -> the parse call its handler makes on the raw body
    "/v1/chat/completions": lambda raw: protocol.parse(ChatCompletionRequest, raw),
    "/v1/completions": lambda raw: protocol.parse(CompletionRequest, raw),
    "/v1/messages": anthropic.parse_request,
    "/v1/messages/count_tokens": lambda raw: anthropic.parse_request(raw, count_only=True),
    "/v1/responses": responses.parse_request,
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_json_nested_1000_deep_names_the_field(route):
    """Audit: JSON nested ~1000 deep was a RecursionError (500) on every POST route."""
    raw = ('{"model": "m", "metadata": ' + nested(1000) + "}").encode()
    rejects(lambda: ROUTES[route](raw), "metadata", "nested more than 128 levels")


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_huge_integer_names_the_field(route):
    """Audit: an integer of more than 4,300 digits was a ValueError (500)."""
    raw = ('{"model": "m", "seed": ' + "9" * 4301 + "}").encode()
    rejects(lambda: ROUTES[route](raw), "seed", "4300 digits")


def test_deep_message_key_and_tool_schema():
    """Audit: nesting >= ~340 in a message key or a tool schema was a RecursionError in the tokenizer's
    escaping. The body bound rejects it first, naming the field; the escaping itself walks any depth."""
    deep = nested(340)
    rejects(lambda: chat({"messages": [{"role": "user", "content": "hi", "extra": json.loads(deep)}]}),
            "messages", "messages[0].extra")
    schema = {"type": "object", "properties": {"p": json.loads(nested(340, "{}"))}}
    rejects(lambda: chat({"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}),
            "tools", "nested more than 128")
    escape = ContentEscape(SPECIAL_TOKENS)
    value = "a<|im_end|>"
    for _ in range(5000):
        value = {"k<think>": [value]}
    assert escape.needed(value)
    copied = escape.escape_tree(value)
    for _ in range(5000):
        [(key, [copied])] = copied.items()
        assert escape.unescape(key) == "k<think>" and key != "k<think>"
    assert escape.unescape(copied) == "a<|im_end|>" and copied != "a<|im_end|>"
    assert not escape.needed({"a": [[["plain", 1, None]]], "b": ("x",)})


def strict_tool(parameters) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "strict": True, "parameters": parameters}}]


SCHEMA_CASES = {   # the audit's strict-tool schemas -> the field the error names
    "minLength Infinity": ({"type": "object", "properties": {"p": {"type": "string", "minLength": float("inf")}}},
                           "properties.p.minLength"),
    "minLength x": ({"type": "object", "properties": {"p": {"type": "string", "minLength": "x"}}},
                    "properties.p.minLength"),
    "properties [1]": ({"type": "object", "properties": [1]}, "parameters.properties"),
    "required 5": ({"type": "object", "properties": {"p": {"type": "string"}}, "required": 5},
                   "parameters.required"),
    "anyOf 5": ({"type": "object", "properties": {"p": {"anyOf": 5}}}, "properties.p.anyOf"),
    "top-level anyOf 5": ({"anyOf": 5}, "parameters.anyOf"),        # (found by `qwen36 fuzz --hostile`: a 200)
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_strict_tool_schema_fields_are_type_checked(case):
    """Audit: OverflowError / ValueError / AttributeError / TypeError (500) while building a strict tool's
    grammar. Now a GrammarError naming the field (the server answers it as a 400 on `tools`), through each
    API's request path; the answer parser reads the same schema without failing."""
    parameters, field = SCHEMA_CASES[case]
    raw = json.dumps(strict_tool(parameters))        # (Infinity travels as JSON's Infinity literal)
    for req in (chat({"tools": json.loads(raw), "tool_choice": "required"}),
                messages({"tools": [{"name": "f", "input_schema": json.loads(raw)[0]["function"]["parameters"],
                                     "strict": True}]}),
                respond({"tools": [{"type": "function", "name": "f", "strict": True,
                                    "parameters": json.loads(raw)[0]["function"]["parameters"]}]})[0]):
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        with pytest.raises(GrammarError, match=field.replace(".", r"\.")):
            tool_call_grammar(tools, required=True)
        call = "<tool_call>\n<function=f>\n<parameter=p>\nv\n</parameter>\n</function>\n</tool_call>"
        [parsed] = parse_assistant(call, tools, thinking=False).tool_calls
        assert json.loads(parsed["function"]["arguments"]) == {"p": "v"}
    assert schema_types({"anyOf": 5, "oneOf": {"a": 1}, "type": "string"}) == {"string"}


def test_responses_reasoning_effort_list():
    """Audit: /v1/responses `reasoning: {"effort": []}` was a TypeError (500)."""
    rejects(lambda: respond({"reasoning": {"effort": []}}), "reasoning.effort", "reasoning.effort")


def test_responses_reasoning_item_content_5():
    """Audit: a reasoning item with `content: 5` was a TypeError (500)."""
    for item in ({"type": "reasoning", "content": 5}, {"type": "reasoning", "summary": 5},
                 {"type": "reasoning", "content": [{"type": "reasoning_text", "text": 5}]}):
        rejects(lambda: respond({"input": [item]}), "input", "input[0].")


def test_messages_output_config_string():
    """Audit: /v1/messages `output_config: "x"` was an AttributeError (500)."""
    rejects(lambda: messages({"output_config": "x"}), "output_config")
    rejects(lambda: messages({"output_config": {"effort": ["low"]}}), "output_config.effort")


def test_count_tokens_deep_json():
    """Audit: deep JSON to /v1/messages/count_tokens was a RecursionError (500); no chat job is made."""
    raw = ('{"messages": ' + nested(2000) + "}").encode()

    def make_chat_job(req):
        raise AssertionError("a chat job was built for a malformed body")

    with pytest.raises(APIError) as info:
        asyncio.run(anthropic.count_tokens(raw, make_chat_job))
    assert info.value.status == 400 and info.value.param == "messages"
    assert anthropic.error_body(info.value)["error"]["type"] == "invalid_request_error"


def test_count_tokens_counts_with_the_job():
    """count_tokens asks the chat job for its count (media from headers) instead of building inputs."""
    class Job:
        async def count_tokens(self):
            return 42

        async def build_inputs(self):
            raise AssertionError("count_tokens must not build inputs (the vision tower)")

    raw = json.dumps({"model": "m", "messages": USER}).encode()
    assert asyncio.run(anthropic.count_tokens(raw, lambda req: Job())) == {"input_tokens": 42}


# ---- more of the same kind ------------------------------------------------------------------------------

def test_other_wrong_types_in_adapters():
    rejects(lambda: messages({"messages": [*USER, {"role": "system", "content": 5}]}), "messages[1].content")
    rejects(lambda: messages({"tools": [{"name": ["f"], "input_schema": {}}]}), "tools")
    rejects(lambda: messages({"thinking": {"type": "enabled", "budget_tokens": -1}}), "thinking")
    odd = {"type": "namespace", "name": ["ns"], "tools": [{"type": "function", "name": "f"}]}
    assert respond({"tools": [odd]})[0].tools is None                  # (was a TypeError: skipped as unknown)
    rejects(lambda: respond({"input": [{"type": "function_call", "name": "f", "arguments": {"a": 1}}]}), "input",
            "arguments")


def test_json_depth_bound_is_exact_and_ignores_strings():
    body = {"messages": USER, "metadata": json.loads(nested(126))}    # the object + 126 lists: 127 levels
    assert chat(body).messages
    assert chat({**body, "metadata": [json.loads(nested(126))]}).messages   # 128
    rejects(lambda: chat({**body, "metadata": [[json.loads(nested(126))]]}), "metadata", "metadata[0][0]")
    # brackets inside strings (escaped quotes and backslashes too) are text
    assert chat({"messages": [{"role": "user", "content": '\\"[' + "[{" * 500}]}).messages[0].content
    for text in ("ends in a backslash \\", '\\\\\\"[[', "\\u005b [ \n"):
        user = [{"role": "user", "content": text}]
        assert chat({**body, "messages": user, "metadata": [json.loads(nested(126))]}).messages[0].content == text
        rejects(lambda: chat({**body, "messages": user, "metadata": [[json.loads(nested(126))]]}), "metadata")
    # another encoding than UTF-8 is walked instead: same bound
    raw = json.dumps({"messages": USER, "metadata": [[json.loads(nested(126))]]}).encode("utf-16")
    rejects(lambda: protocol.parse(ChatCompletionRequest, raw), "metadata")
    assert protocol.parse(ChatCompletionRequest, json.dumps({"messages": USER}).encode("utf-16")).messages


MALFORMED_VALUES = [None, 5, "x", [1], {"type": 5}, float("inf")]
SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "minLength": 1, "maxLength": 5},
                                           "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
          "required": ["a"]}
BODIES = {
    "chat": {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}],
        "tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": SCHEMA}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}, "stop": ["a"], "logit_bias": {"1": 2},
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}},
    "messages": {"max_tokens": 5, "system": [{"type": "text", "text": "s"}], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AA"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"},
                                          {"type": "tool_use", "id": "t", "name": "f", "input": {"a": "x"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "is_error": True,
                                      "content": [{"type": "tool_reference", "tool_name": "g"}]}]}],
        "tools": [{"name": "f", "input_schema": SCHEMA, "strict": True},
                  {"name": "g", "input_schema": SCHEMA, "defer_loading": True}],
        "tool_choice": {"type": "tool", "name": "f"}, "thinking": {"type": "enabled", "budget_tokens": 100},
        "output_config": {"effort": "low"}, "stop_sequences": ["x"]},
    "responses": {"instructions": "i", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"},
                                                        {"type": "input_image", "image_url": "data:,"}]},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "r"}]},
        {"type": "function_call", "name": "f", "call_id": "c", "arguments": "{}", "namespace": "ns"},
        {"type": "function_call_output", "call_id": "c", "output": "o"}],
        "tools": [{"type": "function", "name": "f", "parameters": SCHEMA, "strict": True},
                  {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "f"}]}],
        "tool_choice": {"type": "function", "name": "f"}, "reasoning": {"effort": "low"},
        "text": {"format": {"type": "json_schema", "name": "n", "schema": SCHEMA}}},
}


def _paths(value, path=()):
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, path + (key,))


def _chat_request(api: str, raw: bytes):
    if api == "chat":
        return protocol.parse(ChatCompletionRequest, raw)
    if api == "messages":
        return anthropic.to_chat(anthropic.parse_request(raw))
    req = responses.parse_request(raw)
    chat_req, conversation = responses.to_chat(req, [])
    responses.ResponseStore(2).put("resp_x", conversation)
    return chat_req


@pytest.mark.parametrize("api", sorted(BODIES))
def test_every_field_replaced_by_a_wrong_type(api):
    """Each value of a request that uses most fields, replaced in turn by values of other types: the request
    either parses or is an APIError; then the grammar, the escaping and the answer parser take what parsed
    (a GrammarError is the server's 400)."""
    base, escape = BODIES[api], ContentEscape(SPECIAL_TOKENS)
    for path in _paths(base):
        for value in MALFORMED_VALUES:
            body = copy.deepcopy(base)
            if not path:
                continue
            target = body
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            try:
                req = _chat_request(api, json.dumps(body).encode())
            except APIError as e:
                assert 400 <= e.status < 500
                continue
            tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
            try:
                if req.response_format is not None and protocol.response_schema(req.response_format) is not None:
                    json_grammar(protocol.response_schema(req.response_format))
                if tools:
                    tool_call_grammar(tools, required=True, max_calls=1)
            except (GrammarError, APIError):
                pass
            messages_ = [m.model_dump(exclude_none=True) for m in req.messages]
            escape.needed([messages_, tools])
            escape.escape_tree([messages_, tools])
            parse_assistant("<tool_call>\n<function=f>\n<parameter=b>\n5\n</parameter>\n</function>\n</tool_call>",
                            tools)


# ---- request-size bounds --------------------------------------------------------------------------------

def test_bounds_on_chat_and_completions():
    P = protocol
    assert len(chat({"messages": USER * P.MAX_MESSAGES}).messages) == P.MAX_MESSAGES
    rejects(lambda: chat({"messages": USER * (P.MAX_MESSAGES + 1)}), "messages", str(P.MAX_MESSAGES))
    parts = [{"type": "text", "text": "x"}]
    rejects(lambda: chat({"messages": [{"role": "user", "content": parts * (P.MAX_CONTENT_PARTS + 1)}]}),
            "messages", "messages[0].content")
    tool = {"type": "function", "function": {"name": "f"}}
    rejects(lambda: chat({"tools": [tool] * (P.MAX_TOOLS + 1)}), "tools", str(P.MAX_TOOLS))
    assert len(chat({"stop": ["s" * P.MAX_STOP_CHARS] * P.MAX_STOP}).stop) == P.MAX_STOP
    rejects(lambda: chat({"stop": ["s"] * (P.MAX_STOP + 1)}), "stop", str(P.MAX_STOP))
    rejects(lambda: chat({"stop": "s" * (P.MAX_STOP_CHARS + 1)}), "stop", str(P.MAX_STOP_CHARS))
    rejects(lambda: completion({"stop": ["a", "s" * (P.MAX_STOP_CHARS + 1)]}), "stop", "stop[1]")
    bias = {str(i): 1 for i in range(P.MAX_LOGIT_BIAS + 1)}
    rejects(lambda: chat({"logit_bias": bias}), "logit_bias", str(P.MAX_LOGIT_BIAS))
    rejects(lambda: chat({"logit_bias": {"1": "much"}}), "logit_bias.1")
    rejects(lambda: chat({"stop_token_ids": [1] * (P.MAX_STOP_TOKEN_IDS + 1)}), "stop_token_ids")
    # the audit's 300 one-token prompts x n = 16
    rejects(lambda: completion({"prompt": [[1]] * 300, "n": 16}), "prompt", str(P.MAX_SEQUENCES))
    rejects(lambda: completion({"prompt": ["a"] * 9, "n": 16}), "n", "144 sequences")
    assert len(completion({"prompt": [[1]] * 8, "n": 16}).prompt) == 8
    assert len(completion({"prompt": [1] * 10_000, "n": 16}).prompt) == 10_000    # one prompt of token ids


def test_bounds_on_anthropic_and_responses():
    P = protocol
    rejects(lambda: messages({"stop_sequences": ["s"] * (P.MAX_STOP + 1)}), "stop_sequences")
    rejects(lambda: messages({"stop_sequences": ["s" * (P.MAX_STOP_CHARS + 1)]}), "stop_sequences")
    rejects(lambda: messages({"messages": USER * (P.MAX_MESSAGES + 1)}), "messages")
    rejects(lambda: messages({"system": [{"type": "text", "text": "s"}] * (P.MAX_CONTENT_PARTS + 1)}), "system")
    rejects(lambda: respond({"input": [{"type": "message", "role": "user", "content": "x"}] * (P.MAX_MESSAGES + 1)}),
            "input")
    many = [{"type": "function", "name": f"f{i}"} for i in range(P.MAX_TOOLS)]
    rejects(lambda: respond({"tools": [{"type": "namespace", "name": "ns", "tools": many}]}), "tools")


# ---- the /v1/responses store ----------------------------------------------------------------------------

def conversation(text: str, image: bool = False) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 1_000_000}})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]


def test_store_drops_media_and_keeps_text():
    store = responses.ResponseStore(8, max_bytes=1 << 20)
    original = conversation("look", image=True)
    store.put("resp_a", original)
    kept = store.get("resp_a")
    assert kept[0]["content"] == [{"type": "text", "text": "look"},
                                  {"type": "text", "text": responses.MEDIA_MARKER}]
    assert kept[1] == {"role": "assistant", "content": "ok"}
    assert original[0]["content"][1]["type"] == "image_url"            # the caller's messages are untouched
    assert store.bytes < 10_000                                        # not the 1 MB data URL
    # a continuation through previous_response_id sees the text (and the marker)
    req = responses.parse_request(json.dumps({"input": "and now?", "previous_response_id": "resp_a"}).encode())
    chat_req, _ = responses.to_chat(req, store.get(req.previous_response_id))
    assert [m.role for m in chat_req.messages] == ["user", "assistant", "user"]
    assert chat_req.messages[0].content[1]["text"] == responses.MEDIA_MARKER


def test_store_is_bounded_by_bytes_and_count():
    store = responses.ResponseStore(100, max_bytes=200_000)
    for i in range(50):
        store.put(f"resp_{i}", conversation(f"{i}" + "x" * 20_000))    # ~20 KB each
    assert store.bytes <= 200_000 and 5 <= len(store) < 10
    assert store.get("resp_49")[0]["content"][0]["text"].startswith("49")
    rejects(lambda: store.get("resp_0"), "previous_response_id")
    store.put("resp_huge", conversation("y" * 300_000))                 # alone above the bound: not stored
    rejects(lambda: store.get("resp_huge"), "previous_response_id")
    assert store.get("resp_49") and store.bytes <= 200_000
    counted = responses.ResponseStore(3)
    for i in range(5):
        counted.put(f"r{i}", conversation("x"))
    assert len(counted) == 3 and counted.max_bytes == 64 << 20
    rejects(lambda: counted.get("r1"), "previous_response_id")
    counted.put("r4", conversation("again"))                           # a re-put replaces, not doubles
    assert len(counted) == 3 and counted.bytes == sum(s for _, s in counted._items.values())


def test_a_value_only_sampling_params_refuses_names_its_field():
    """What passes the request schema but not SamplingParams (a non-finite penalty, a negative stop token id)
    is a 400 whose param names the field, carried by the exception rather than parsed from its text."""
    from types import SimpleNamespace

    from qwen36.sampling import SamplingParams
    from qwen36.server.generation import sampling_params

    ctx = SimpleNamespace(sampling_params=lambda **kw: SamplingParams(**kw))
    for fields, name in (({"repetition_penalty": float("inf")}, "repetition_penalty"),
                         ({"stop_token_ids": [-1]}, "stop_token_ids")):
        with pytest.raises(APIError) as e:
            sampling_params(ctx, fields, 8, None, None)
        assert e.value.param == name, e.value
