"""qwen36.chat: the Qwen3.6 prompt format, checked three ways.

* worked examples of the format, written out by hand from the model card (exact strings);
* renderings made OFFLINE with the official Qwen3.6-35B-A3B `chat_template.jinja` (MD5
  52b6d51ae5b203cb67e64b648494dad2) through transformers' own `render_jinja_template`, stored with their
  inputs in tests/data/chat/official_renderings.json (the template itself is not part of this repo);
* our Python renderer against our Jinja template on many seeded random conversations.
"""
from __future__ import annotations

import copy
import json
import random
import re
from datetime import datetime
from pathlib import Path

import pytest

from qwen36.chat import CHAT_TEMPLATE, ChatTemplate, ChatTemplateError, make_sandbox, render_chat

OFFICIAL = json.loads((Path(__file__).parent / "data" / "chat" / "official_renderings.json").read_text("utf-8"))
OURS = ChatTemplate(CHAT_TEMPLATE)
OPTIONS = ("add_generation_prompt", "enable_thinking", "preserve_thinking", "add_vision_id")


def both(case: dict) -> tuple[str, str]:
    """(render_chat, our Jinja template) outputs for a case {"messages", "tools"?, **options}."""
    args = {key: copy.deepcopy(value) for key, value in case.items() if key in ("messages", "tools", *OPTIONS)}
    return render_chat(**copy.deepcopy(args)), OURS.render(**args)


# ----------------------------------------------------------------------------------------------------------
# chat_format.md §6, inputs as in the document (its "we should call" is the mangled "I should call" that
# the rendered string shows), expected strings exactly its repr() lines
# ----------------------------------------------------------------------------------------------------------

ANIMALS = [
    {"role": "user", "content": [{"type": "image", "image": "file:///data/cat.png"},
                                 {"type": "text", "text": "What animal is this?"}]},
    {"role": "assistant", "reasoning_content": "The picture shows whiskers and pointy ears.",
     "content": "It is a cat."},
    {"role": "user", "content": [{"type": "text", "text": "And this video?"},
                                 {"type": "video", "video": "file:///data/dog.mp4"}]},
]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"}, "days": {"type": "integer"},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
EXAMPLES = {
    "1a": ({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "What is 2+2?"}], "tools": None, "add_generation_prompt": True},
           '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n'),  # noqa: E501
    "1b": ({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "What is 2+2?"}], "tools": None, "add_generation_prompt": True,
            "enable_thinking": False},
           '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'),  # noqa: E501
    "2": ({"messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Tokyo for 2 days?"},
        {"role": "assistant", "reasoning_content": "I should call get_weather twice.", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Tokyo", "days": 2, "units": "celsius",
                                                               "extra": {"a": [1, True, None]}}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18, "sky": "cloudy"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 24, "sky": "sunny"}'}],
        "tools": [WEATHER_TOOL], "add_generation_prompt": True},
        '<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}, "days": {"type": "integer"}, "units": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>\n\nYou are a weather bot.<|im_end|>\n<|im_start|>user\nWeather in Paris and Tokyo for 2 days?<|im_end|>\n<|im_start|>assistant\n<think>\nI should call get_weather twice.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nTokyo\n</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=units>\ncelsius\n</parameter>\n<parameter=extra>\n{"a": [1, true, null]}\n</parameter>\n</function>\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 18, "sky": "cloudy"}\n</tool_response>\n<tool_response>\n{"temp": 24, "sky": "sunny"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n'),  # noqa: E501
    "3a": ({"messages": ANIMALS, "tools": None, "add_generation_prompt": True},
           '<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What animal is this?<|im_end|>\n<|im_start|>assistant\nIt is a cat.<|im_end|>\n<|im_start|>user\nAnd this video?<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n<think>\n'),  # noqa: E501
    "3b": ({"messages": ANIMALS, "tools": None, "add_generation_prompt": True, "preserve_thinking": True},
           '<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What animal is this?<|im_end|>\n<|im_start|>assistant\n<think>\nThe picture shows whiskers and pointy ears.\n</think>\n\nIt is a cat.<|im_end|>\n<|im_start|>user\nAnd this video?<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n<think>\n'),  # noqa: E501
    "3c": ({"messages": ANIMALS, "tools": None, "add_generation_prompt": True, "add_vision_id": True},
           '<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What animal is this?<|im_end|>\n<|im_start|>assistant\nIt is a cat.<|im_end|>\n<|im_start|>user\nAnd this video?Video 1: <|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n<think>\n'),  # noqa: E501
    # the document renders with transformers' default add_generation_prompt=False; ours defaults to True
    "4": ({"messages": [
        {"role": "user", "content": "  Hi  "},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nHello!"},
        {"role": "user", "content": "List files"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{"type": "function", "function": {
            "name": "ls", "arguments": {"path": "/data", "flags": ["-l", "-a"], "recursive": False, "depth": 1.5}}}]},
        {"role": "tool", "content": "a.txt\nb.txt"},
        {"role": "assistant", "reasoning_content": "Two files.", "content": "There are two files."}],
        "tools": None, "add_generation_prompt": False},
        '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nList files<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nLet me check.\n\n<tool_call>\n<function=ls>\n<parameter=path>\n/data\n</parameter>\n<parameter=flags>\n["-l", "-a"]\n</parameter>\n<parameter=recursive>\nfalse\n</parameter>\n<parameter=depth>\n1.5\n</parameter>\n</function>\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\na.txt\nb.txt\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\nTwo files.\n</think>\n\nThere are two files.<|im_end|>\n'),  # noqa: E501
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_worked_examples(name):
    case, expected = EXAMPLES[name]
    python, jinja = both(case)
    assert python == expected
    assert jinja == expected


# ----------------------------------------------------------------------------------------------------------
# Renderings by the official template (made offline, see the file's "provenance")
# ----------------------------------------------------------------------------------------------------------

def test_official_data_is_what_we_think():
    provenance = OFFICIAL["provenance"]
    assert provenance["template_md5"] == "52b6d51ae5b203cb67e64b648494dad2"
    assert provenance["template_bytes"] == 7764
    assert len(OFFICIAL["renderings"]) >= 40 and len(OFFICIAL["errors"]) >= 8


@pytest.mark.parametrize("case", OFFICIAL["renderings"], ids=lambda case: case["name"])
def test_official_renderings(case):
    python, jinja = both(case)
    assert python == case["expected"]
    assert jinja == case["expected"]


@pytest.mark.parametrize("case", OFFICIAL["errors"], ids=lambda case: case["name"])
def test_official_rejections(case):
    """What the official template rejects, we reject with its message, in both renderers."""
    args = {key: value for key, value in case.items() if key in ("messages", "tools", *OPTIONS)}
    with pytest.raises(ChatTemplateError) as python:
        render_chat(**copy.deepcopy(args))
    with pytest.raises(ChatTemplateError) as jinja:
        OURS.render(**copy.deepcopy(args))
    assert str(python.value) == str(jinja.value) == case["error"]


# ----------------------------------------------------------------------------------------------------------
# Random conversations (also the generator of the official renderings' inputs)
# ----------------------------------------------------------------------------------------------------------

TEXTS = ["Hello", "  padded with spaces  ", "\n\nleading and trailing newlines\n\n", "multi\nline\n\ntext",
         "unicode: héllo wörld, 你好, emoji 🚀", "html <b>&amp;</b> 'quotes' \"double\"", "",
         "<tool_response>looks like a tool response</tool_response>", "tabs\tand\u00a0nbsp "]
TOOLS = [
    WEATHER_TOOL,
    {"type": "function", "function": {"name": "search", "description": "Suche im Netz – ünïcödé & <html>",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                                     "required": ["q"]}}},
    {"name": "run_shell", "description": "bare function schema, no OpenAI wrapper",
     "parameters": {"type": "object", "properties": {"cmd": {"type": "array", "items": {"type": "string"}}}}},
]
ARG_VALUES = ["Paris", "multi\nline value", "  spaced  ", "ünï 中文", "", 0, 42, -7, 1.5, 1e-07, True, False, None,
              [], ["-l", "-a"], [1, [2, {"x": None}]], {}, {"nested": {"k": "v", "n": 1.25}}, "<b>&</b>"]


def _text_or_parts(rng: random.Random, media: bool) -> str | list | None:
    kind = rng.random()
    if kind < 0.6:
        return rng.choice(TEXTS)
    if kind < 0.65:
        return None
    parts = []
    for _ in range(rng.randint(1, 4)):
        pick = rng.random() if media else 0.0
        if pick < 0.5:
            parts.append({"type": "text", "text": rng.choice(TEXTS)})
        elif pick < 0.65:
            parts.append({"type": "image", "image": "file:///img.png"})
        elif pick < 0.75:
            parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
        elif pick < 0.85:
            parts.append({"type": "video", "video": "file:///clip.mp4"})
        else:
            parts.append({"type": "image"})
    return parts


def _arguments(rng: random.Random):
    arguments = {f"p{i}_{rng.choice('xyz')}": rng.choice(ARG_VALUES) for i in range(rng.randint(0, 4))}
    form = rng.random()
    if form < 0.35:  # a JSON string, as OpenAI clients send it
        return json.dumps(arguments, ensure_ascii=rng.random() < 0.5)
    if form < 0.4 and not arguments:
        return rng.choice([None, ""])
    return arguments


def _tool_call(rng: random.Random, index: int) -> dict:
    name = rng.choice(["get_weather", "search", "run_shell", "ünï_tool"])
    if rng.random() < 0.8:
        return {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": _arguments(rng)}}
    return {"name": name, "arguments": _arguments(rng)}


def _assistant(rng: random.Random, calls: list) -> dict:
    message = {"role": "assistant", "content": _text_or_parts(rng, media=False)}
    style = rng.random()
    if style < 0.3:
        message[rng.choice(["reasoning_content", "reasoning_content", "reasoning", "thinking"])] = rng.choice(TEXTS)
    elif style < 0.5 and isinstance(message["content"], str):
        opener = rng.choice(["<think>\n", "<think>", ""])
        message["content"] = f"{opener}{rng.choice(TEXTS)}\n</think>\n\n{message['content']}"
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_results(rng: random.Random, calls: list) -> list[dict]:
    results = [{"role": "tool", "tool_call_id": f"call_{i}", "content": _text_or_parts(rng, media=True)}
               for i in range(len(calls))]
    if rng.random() < 0.2:  # results sent back as one user message of <tool_response> blocks
        joined = "\n".join(f"<tool_response>\n{rng.choice(TEXTS)}\n</tool_response>" for _ in calls)
        return [{"role": "user", "content": rng.choice([joined, f"  {joined}\n"])}]
    return results


def random_conversation(rng: random.Random) -> dict:
    """A valid conversation with random options: {"messages", "tools"?, **options}."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice([rng.choice(TEXTS), [{"type": "text",
                                                                                        "text": "You are terse."}]])})
    turns = rng.randint(1, 3)
    for turn in range(turns):
        # the first question is a real one: the template needs at least one user query
        content = rng.choice(TEXTS[:6]) if turn == 0 else _text_or_parts(rng, media=True)
        messages.append({"role": "user", "content": content})
        if turn == turns - 1 and rng.random() < 0.4:
            break  # ends on the user's question
        for step in range(rng.randint(0, 2)):  # agent loop: calls, then their results
            calls = [_tool_call(rng, i) for i in range(rng.randint(1, 3))]
            messages.append(_assistant(rng, calls))
            messages.extend(_tool_results(rng, calls))
        if rng.random() < 0.75:
            messages.append(_assistant(rng, []))
    case = {"messages": messages}
    if rng.random() < 0.7:
        case["tools"] = rng.choice([None, [], TOOLS[:1], TOOLS, TOOLS[1:]])
    for option in OPTIONS:
        if rng.random() < 0.75:
            case[option] = rng.choice([True, False])
    return case


@pytest.mark.parametrize("seed", range(300))
def test_python_and_jinja_agree_on_random_conversations(seed):
    python, jinja = both(random_conversation(random.Random(seed)))
    assert python == jinja


# ----------------------------------------------------------------------------------------------------------
# Specific behaviours
# ----------------------------------------------------------------------------------------------------------

def render_all(**case) -> str:
    python, jinja = both(case)
    assert python == jinja
    return python


def test_string_arguments_are_parsed_like_dicts():
    arguments = {"city": "Zürich", "days": 3, "exact": 2.50, "flags": [True, None], "opts": {"b": 1, "a": 2}}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": arguments}}]}
    as_string = copy.deepcopy(call)
    as_string["tool_calls"][0]["function"]["arguments"] = json.dumps(arguments)
    user = {"role": "user", "content": "go"}
    rendered = render_all(messages=[user, call])
    assert render_all(messages=[user, as_string]) == rendered
    # values: strings raw, everything else JSON; key order kept, non-ASCII kept
    assert ("<parameter=city>\nZürich\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=exact>\n2.5\n"
            "</parameter>\n<parameter=flags>\n[true, null]\n</parameter>\n<parameter=opts>\n{\"b\": 1, \"a\": 2}\n"
            "</parameter>\n</function>\n</tool_call><|im_end|>\n") in rendered


@pytest.mark.parametrize("arguments", [None, "", {}])
def test_empty_arguments(arguments):
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "now", "arguments": arguments}}]}]
    assert render_all(messages=messages, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=now>\n</function>\n</tool_call>"
        "<|im_end|>\n")


def test_flat_tool_call_shape_renders_like_openai_shape():
    user = {"role": "user", "content": "go"}
    flat = {"role": "assistant", "content": "x", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}
    wrapped = {"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}
    assert render_all(messages=[user, flat]) == render_all(messages=[user, wrapped])


@pytest.mark.parametrize("key", ["reasoning", "thinking"])
def test_reasoning_aliases_fill_reasoning_content(key):
    user = {"role": "user", "content": "q"}
    expected = render_all(messages=[user, {"role": "assistant", "reasoning_content": "why", "content": "a"}])
    assert "<think>\nwhy\n</think>\n\na" in expected
    assert render_all(messages=[user, {"role": "assistant", key: "why", "content": "a"}]) == expected
    # an explicit reasoning_content wins over the aliases
    both_given = {"role": "assistant", "reasoning_content": "why", key: "other", "content": "a"}
    assert render_all(messages=[user, both_given]) == expected


def test_inputs_are_not_modified():
    case = random_conversation(random.Random(7))
    case["messages"].append({"role": "assistant", "reasoning": "r", "content": None,
                             "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]})
    before = copy.deepcopy(case)
    render_chat(**case)
    OURS.render(**case)
    assert case == before


def test_thinking_history_rules():
    messages = [{"role": "user", "content": "q1"},
                {"role": "assistant", "reasoning_content": " r1 ", "content": " a1 "},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "calling", "tool_calls": [{"name": "f", "arguments": {}}]},
                {"role": "tool", "content": "out"},
                {"role": "user", "content": "<tool_response>\nmore\n</tool_response>"}]
    default = render_all(messages=messages)
    # before the last real query: no think block; after it (the agent loop): a think block, even if empty
    assert "<|im_start|>assistant\na1<|im_end|>" in default
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\ncalling\n\n<tool_call>" in default
    preserved = render_all(messages=messages, preserve_thinking=True)
    assert "<|im_start|>assistant\n<think>\nr1\n</think>\n\na1<|im_end|>" in preserved
    # enable_thinking only changes the generation prompt
    off = render_all(messages=messages, enable_thinking=False)
    assert off == default[: -len("<think>\n")] + "<think>\n\n</think>\n\n"
    assert render_all(messages=messages, add_generation_prompt=False) == default[: -len(
        "<|im_start|>assistant\n<think>\n")]


@pytest.mark.parametrize("value", [None, 0, "no"])
def test_only_false_turns_thinking_off_and_only_true_preserves(value):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "r", "content": "a"},
                {"role": "user", "content": "q2"}]
    assert render_all(messages=messages, enable_thinking=value) == render_all(messages=messages)
    assert render_all(messages=messages, preserve_thinking=value) == render_all(messages=messages)


def test_media_numbering_runs_across_the_conversation():
    image, video = {"type": "image", "image": "a.png"}, {"type": "video", "video": "b.mp4"}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "and"}, video, image]},
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "tool", "content": [video]},
                {"role": "user", "content": [{"type": "text", "text": " last "}, image]}]
    rendered = render_all(messages=messages, add_vision_id=True, add_generation_prompt=False)
    assert re.findall(r"(Picture \d+|Video \d+): <\|vision_start\|>", rendered) == [
        "Picture 1", "Video 1", "Picture 2", "Picture 3", "Video 2", "Picture 4"]
    assert render_all(messages=messages).count("<|image_pad|>") == 4


def test_tool_results_group_into_one_user_turn():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [{"name": "a", "arguments": {}},
                                                                      {"name": "b", "arguments": {}}]},
                {"role": "tool", "content": " one "}, {"role": "tool", "content": "two"},
                {"role": "assistant", "content": "done"}]
    assert ("</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\none\n</tool_response>\n<tool_response>\n"
            "two\n</tool_response><|im_end|>\n<|im_start|>assistant\n") in render_all(messages=messages)


def test_system_block_variants():
    user = {"role": "user", "content": "q"}
    assert render_all(messages=[{"role": "system", "content": "  "}, user]).startswith(
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    with_tools = render_all(messages=[{"role": "system", "content": " \n "}, user], tools=[{"name": "f"}])
    assert with_tools.startswith('<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n'
                                 '<tools>\n{"name": "f"}\n</tools>\n\nIf you choose')
    assert "</IMPORTANT><|im_end|>\n<|im_start|>user" in with_tools
    assert render_all(messages=[user], tools=[]) == render_all(messages=[user])


# ----------------------------------------------------------------------------------------------------------
# Rejections
# ----------------------------------------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}
REJECTIONS = {
    "system-not-first": ([USER, {"role": "system", "content": "s"}], "System message must be at the beginning."),
    "developer-role": ([{"role": "developer", "content": "d"}, USER], "Unexpected message role."),
    "missing-role": ([USER, {"content": "x"}], "Unexpected message role."),
    "no-user-query": ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                      "No user query found in messages."),
    "only-tool-responses": ([{"role": "user", "content": "<tool_response>x</tool_response>"}],
                            "No user query found in messages."),
    "no-messages": ([], "No messages provided."),
    "image-in-system": ([{"role": "system", "content": [{"type": "image", "image": "x"}]}, USER],
                        "System message cannot contain images."),
    "video-in-system": ([{"role": "system", "content": [{"type": "video", "video": "x"}]}, USER],
                        "System message cannot contain videos."),
    "unknown-part": ([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}],
                     "Unexpected item type in content."),
    "content-dict": ([{"role": "user", "content": {"text": "x"}}], "Unexpected content type."),
    "content-number": ([USER, {"role": "assistant", "content": 3}], "Unexpected content type."),
    # malformed input, caught before rendering
    "not-a-list": ({"role": "user", "content": "x"}, "messages must be a list of message dicts, got dict"),
    "not-a-dict": ([USER, "hello"], "messages[1] must be a dict, got str"),
    "string-part": ([{"role": "user", "content": ["hello"]}], "messages[0].content[0] must be a dict content part"),
    "non-string-text": ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
                        "messages[0].content[0].text must be a string, got int"),
    "bad-json-arguments": ([USER, {"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                                     "arguments": "{oops"}}]}],
                           "messages[1].tool_calls[0].function.arguments is not valid JSON"),
    "array-arguments": ([USER, {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1, 2]"}]}],
                        "messages[1].tool_calls[0].arguments must be a JSON object, got list"),
    "list-arguments": ([USER, {"role": "assistant", "tool_calls": [{"name": "f", "arguments": [1]}]}],
                       "messages[1].tool_calls[0].arguments must be a JSON object, got list"),
    "nameless-call": ([USER, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
                      "messages[1].tool_calls[0].function.name must be a string, got None"),
    "tool-calls-not-list": ([USER, {"role": "assistant", "tool_calls": {"name": "f"}}],
                            "messages[1].tool_calls must be a list of tool calls, got dict"),
    "function-not-dict": ([USER, {"role": "assistant", "tool_calls": [{"function": "f"}]}],
                          "messages[1].tool_calls[0].function must be a dict"),
}


@pytest.mark.parametrize("name", REJECTIONS)
def test_rejections(name):
    messages, message = REJECTIONS[name]
    for render in (render_chat, OURS.render):
        with pytest.raises(ChatTemplateError) as error:
            render(copy.deepcopy(messages))
        assert str(error.value).startswith(message)


def test_bad_tools_are_rejected():
    for tools in ({"name": "f"}, ["f"], "tools"):
        for render in (render_chat, OURS.render):
            with pytest.raises(ChatTemplateError, match="tools must be a list of dicts"):
                render([USER], tools=tools)


def test_unserialisable_argument_is_a_chat_template_error():
    messages = [USER, {"role": "assistant", "tool_calls": [{"name": "f", "arguments": {"x": {1, 2}}}]}]
    for render in (render_chat, OURS.render):
        with pytest.raises(ChatTemplateError, match="not JSON serializable"):
            render(messages)


# ----------------------------------------------------------------------------------------------------------
# The sandbox and ChatTemplate
# ----------------------------------------------------------------------------------------------------------

def test_sandbox_matches_transformers_environment():
    env = make_sandbox()
    value = {"b": "<&'>", "a": "ünï", "n": [1, 2.5, None]}
    assert env.from_string("{{ v | tojson }}").render(v=value) == '{"b": "<&\'>", "a": "ünï", "n": [1, 2.5, null]}'
    assert env.from_string("{{ v | tojson(indent=2, sort_keys=true) }}").render(v={"b": 1, "a": 2}) == \
        '{\n  "a": 2,\n  "b": 1\n}'
    assert env.from_string("{% for i in range(9) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"
                           ).render() == "012"
    # trim_blocks + lstrip_blocks
    assert env.from_string("  {% if true %}\nx\n  {% endif %}\ny").render() == "x\ny"
    assert env.from_string("{{ strftime_now('%Y') }}").render() == str(datetime.now().year)
    assert env.from_string("{{ dict(a=1) | tojson }}|{{ dict.fromkeys('ab', 0) | tojson }}").render() == \
        '{"a": 1}|{"a": 0, "b": 0}'
    assert env.from_string("{% set ns = namespace(self=1, n=0) %}{% set ns.n = ns.n + 2 %}{{ ns.self + ns.n }}"
                           ).render() == "3"
    assert env.from_string("{% generation %}kept{% endgeneration %}").render() == "kept"
    with pytest.raises(ChatTemplateError, match="^boom$"):
        env.from_string("{{ raise_exception('boom') }}").render()


def test_template_runtime_errors_become_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="Can only get item pairs from a mapping"):
        ChatTemplate("{% for k, v in messages | items %}{% endfor %}").render([USER])
    with pytest.raises(ChatTemplateError, match="has no attribute 'nope'"):
        ChatTemplate("{{ messages[0].nope.deeper }}").render([USER])
    for template in ("{% set ns = namespace(_x=1) %}", "{% set ns = namespace() %}{% set ns._x = 1 %}"):
        with pytest.raises(ChatTemplateError, match="underscore"):
            ChatTemplate(template).render([USER])
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([USER])
    with pytest.raises(ChatTemplateError, match=r"custom template: invalid Jinja template \(line 1\)"):
        ChatTemplate("{% if %}", origin="custom template")


def test_template_receives_options_as_variables():
    template = ChatTemplate("{{ add_generation_prompt }} {{ enable_thinking }} {{ preserve_thinking }} "
                            "{{ add_vision_id }} {{ tools | tojson }} {{ messages | length }}")
    assert template.source == "custom"
    assert template.render([USER]) == "True True False False null 1"
    assert template.render([USER], tools=[{"name": "f"}], add_generation_prompt=False, enable_thinking=False,
                           preserve_thinking=True, add_vision_id=True) == 'False False True True [{"name": "f"}] 1'


def test_from_checkpoint_prefers_chat_template_jinja(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "ignored", "eos_token": "<e>"}))
    template = ChatTemplate.from_checkpoint(tmp_path)
    assert template.source == "checkpoint"
    assert template.origin == str(tmp_path / "chat_template.jinja")
    case, expected = EXAMPLES["2"]
    assert template.render(**copy.deepcopy(case)) == expected


def test_from_checkpoint_reads_tokenizer_config(tmp_path):
    config = {"chat_template": "{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}",
              "bos_token": {"content": "<s>", "special": True}, "eos_token": "<|im_end|>", "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.from_checkpoint(tmp_path)
    assert template.source == "checkpoint"
    assert template.render([USER]) == "<s>|<|im_end|>|hi"


def test_from_checkpoint_picks_the_default_of_named_templates(tmp_path):
    config = {"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_checkpoint(tmp_path).render([USER]) == "plain"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "x", "template": "y"}]}))
    with pytest.raises(ChatTemplateError, match="no template named 'default'"):
        ChatTemplate.from_checkpoint(tmp_path)


def test_from_checkpoint_without_template_uses_builtin(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    template = ChatTemplate.from_checkpoint(tmp_path)
    assert template.source == "builtin"
    case, expected = EXAMPLES["3c"]
    assert template.render(**copy.deepcopy(case)) == expected


def test_from_checkpoint_errors_name_the_file(tmp_path):
    broken = tmp_path / "chat_template.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=f"{broken}: invalid Jinja template"):
        ChatTemplate.from_checkpoint(tmp_path)
    broken.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ChatTemplateError, match=f"{broken}: cannot read chat template"):
        ChatTemplate.from_checkpoint(tmp_path)
    broken.unlink()
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json: cannot read"):
        ChatTemplate.from_checkpoint(tmp_path)
    with pytest.raises(ChatTemplateError, match="checkpoint directory not found"):
        ChatTemplate.from_checkpoint(tmp_path / "missing")
