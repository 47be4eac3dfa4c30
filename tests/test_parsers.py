"""qwen36.parsers: reasoning / content / tool-call split of raw Qwen3.6 output, whole-text and streamed."""
from __future__ import annotations

import json
import random
import re

import pytest

from qwen36.parsers import AssistantStreamParser, ChatResult, merge_deltas, parse_assistant

PROBE_PROPERTIES = {
    "s": {"type": "string"},
    "n": {"type": "integer"},
    "x": {"type": "number"},
    "flag": {"type": "boolean"},
    "obj": {"type": "object"},
    "arr": {"type": "array"},
    "nothing": {"type": "null"},
    "maybe_int": {"type": ["integer", "null"]},
    "int_or_str": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    "num_or_null": {"type": "number", "nullable": True},
    "bool_or_str": {"type": ["boolean", "string"]},
    "color": {"enum": ["red", "007"]},
    "level": {"enum": [1, 2, 3]},
    "note": {"type": "text"},
    "count": {"type": "int64"},
}
TOOLS = [
    {"type": "function", "function": {"name": "probe", "parameters": {"type": "object",
                                                                         "properties": PROBE_PROPERTIES}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"name": "write_file", "parameters": {"type": "object", "properties": {   # flat form
        "path": {"type": "string"}, "content": {"type": "string"}}}},
]
ID_RE = re.compile(r"call_[0-9a-f]{24}")


def call(name: str, **params: str) -> str:
    """A tool call exactly as the model writes it (and the chat template renders it)."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def args_of(result: ChatResult) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in result.tool_calls]


def probe(**params: str) -> dict:
    """The arguments of one `probe` call made with these raw parameter values."""
    result = parse_assistant(call("probe", **params), TOOLS, thinking=False)
    assert result.content is None, result
    [(name, args)] = args_of(result)
    return args


# ---- reasoning / content split --------------------------------------------------------------------------

def test_reasoning_and_content_split():
    r = parse_assistant("The user greets me.\nI reply.\n</think>\n\nHello! How can I help?")
    assert r == ChatResult(content="Hello! How can I help?", reasoning_content="The user greets me.\nI reply.",
                           tool_calls=[])


def test_empty_reasoning_and_content_are_none():
    assert parse_assistant("\n</think>\n\nHi") == ChatResult("Hi", None, [])
    assert parse_assistant("Thinking.\n</think>\n\n") == ChatResult(None, "Thinking.", [])
    assert parse_assistant("") == ChatResult(None, None, [])
    assert parse_assistant("  \n", thinking=False) == ChatResult(None, None, [])


def test_truncated_reasoning_without_close_is_all_reasoning():
    r = parse_assistant("Step 1: consider the <b>input</b>.\nStep 2: the answer might be")
    assert r == ChatResult(None, "Step 1: consider the <b>input</b>.\nStep 2: the answer might be", [])


def test_thinking_off_is_all_content_and_a_bare_close_stays_literal():
    assert parse_assistant("\n\nParis is the capital.\n", thinking=False) == ChatResult("Paris is the capital.",
                                                                                     None, [])
    r = parse_assistant("Oops</think>\n\nanswer", thinking=False)
    assert r == ChatResult("Oops</think>\n\nanswer", None, [])


def test_leading_think_block_is_reasoning_in_both_modes():
    text = "\n<think>\nold-style reasoning\n</think>\n\nAnswer."
    expected = ChatResult("Answer.", "old-style reasoning", [])
    assert parse_assistant(text, thinking=True) == expected
    assert parse_assistant(text, thinking=False) == expected


def test_think_tag_not_at_start_is_literal_and_second_close_is_content():
    r = parse_assistant("I saw <think> in a doc.\n</think>\n\nA </think> B")
    assert r == ChatResult("A </think> B", "I saw <think> in a doc.", [])


def test_whitespace_normalised_like_the_template():
    r = parse_assistant("\n\n  R  \n\n</think>\n\n\n  Text.  \n\n" + call("get_weather", city="Oslo") + "\n")
    assert (r.reasoning_content, r.content) == ("R", "Text.")


# ---- tool calls -----------------------------------------------------------------------------------------

def test_template_example_4_round_trips():
    """chat_format.md Example 4: the rendered assistant turn parses back to its own messages."""
    tools = [{"type": "function", "function": {"name": "ls", "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}, "flags": {"type": "array", "items": {"type": "string"}},
        "recursive": {"type": "boolean"}, "depth": {"type": "number"}}}}}]
    text = ("Let me check.\n\n<tool_call>\n<function=ls>\n<parameter=path>\n/data\n</parameter>\n"
            "<parameter=flags>\n[\"-l\", \"-a\"]\n</parameter>\n<parameter=recursive>\nfalse\n</parameter>\n"
            "<parameter=depth>\n1.5\n</parameter>\n</function>\n</tool_call>")
    r = parse_assistant(text, tools, thinking=False)
    assert r.content == "Let me check." and r.reasoning_content is None
    [c] = r.tool_calls
    assert c["type"] == "function" and ID_RE.fullmatch(c["id"])
    assert c["function"] == {"name": "ls", "arguments":
                             '{"path": "/data", "flags": ["-l", "-a"], "recursive": false, "depth": 1.5}'}


def test_tool_call_without_close_think_ends_reasoning():
    r = parse_assistant("I need the weather.\n\n" + call("get_weather", city="Paris", days="3"), TOOLS)
    assert (r.reasoning_content, r.content) == ("I need the weather.", None)
    assert args_of(r) == [("get_weather", {"city": "Paris", "days": 3})]


def test_tool_calls_inside_reasoning_before_close_are_kept():
    """vLLM #39056: calls written inside <think>…</think> must not be lost."""
    text = ("Let me look it up.\n" + call("get_weather", city="Rome") + "\nAnd the other city.\n"
            + call("get_weather", city="Bern") + "\n</think>\n\nChecking both.")
    r = parse_assistant(text, TOOLS)
    assert r.reasoning_content == "Let me look it up.\n\nAnd the other city."
    assert r.content == "Checking both."
    assert args_of(r) == [("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Bern"})]


def test_several_tool_calls_with_content_before():
    text = ("Plan.\n</think>\n\nI'll check three cities.\n\n" + call("get_weather", city="A") + "\n"
            + call("get_weather", city="B", days="2") + "\n" + call("write_file", path="x.txt", content="hi"))
    r = parse_assistant(text, TOOLS)
    assert r.content == "I'll check three cities." and r.reasoning_content == "Plan."
    assert args_of(r) == [("get_weather", {"city": "A"}), ("get_weather", {"city": "B", "days": 2}),
                          ("write_file", {"path": "x.txt", "content": "hi"})]
    ids = [c["id"] for c in r.tool_calls]
    assert all(ID_RE.fullmatch(i) for i in ids) and len(set(ids)) == 3


def test_only_tool_calls_gives_content_none():
    r = parse_assistant("\n</think>\n\n" + call("get_weather", city="Oslo"), TOOLS)
    assert r.content is None and r.reasoning_content is None and len(r.tool_calls) == 1


def test_text_after_tool_call_is_content():
    r = parse_assistant(call("get_weather", city="Oslo") + "\nDone.", TOOLS, thinking=False)
    assert r.content == "Done." and args_of(r) == [("get_weather", {"city": "Oslo"})]


def test_call_with_no_parameters_and_lenient_layout():
    assert args_of(parse_assistant("<tool_call><function=now></function></tool_call>", thinking=False)) == [
        ("now", {})]
    # no </function>, no newlines, extra spaces
    text = "<tool_call>  <function=get_weather><parameter=city>Lima</parameter></tool_call>"
    assert args_of(parse_assistant(text, TOOLS, thinking=False)) == [("get_weather", {"city": "Lima"})]


@pytest.mark.parametrize("prop, raw, expected", [
    ("s", "007", "007"),
    ("s", "  padded  ", "  padded  "),
    ("s", "true", "true"),
    ("s", "null", "null"),
    ("s", '{"a": 1}', '{"a": 1}'),
    ("n", "42", 42),
    ("n", "-7", -7),
    ("n", "007", 7),
    ("n", "5.0", 5),
    ("n", "5.5", "5.5"),
    ("n", "many", "many"),
    ("n", "null", None),
    ("count", "12", 12),
    ("x", "1.5", 1.5),
    ("x", "2.0", 2),
    ("x", "3", 3),
    ("x", "1e3", 1000),
    ("x", "12345678901234567890", 12345678901234567890),
    ("x", "nan", "nan"),
    ("x", "inf", "inf"),
    ("flag", "true", True),
    ("flag", "False", False),
    ("flag", "TRUE", True),
    ("flag", "yes", "yes"),
    ("obj", '{"a": [1, 2], "b": {"c": null}}', {"a": [1, 2], "b": {"c": None}}),
    ("obj", "{'a': True, 'b': None}", {"a": True, "b": None}),
    ("obj", "[1, 2]", "[1, 2]"),
    ("obj", "{broken", "{broken"),
    ("obj", "{'a': {1, 2}}", "{'a': {1, 2}}"),
    ("obj", '{"a": NaN}', '{"a": NaN}'),
    ("arr", '["-l", "-a"]', ["-l", "-a"]),
    ("arr", "['x', 1]", ["x", 1]),
    ("arr", "a, b", "a, b"),
    ("nothing", "null", None),
    ("nothing", "None", None),
    ("maybe_int", "null", None),
    ("maybe_int", "4", 4),
    ("int_or_str", "4", 4),
    ("int_or_str", "007", "007"),
    ("int_or_str", "null", "null"),
    ("int_or_str", "four", "four"),
    ("int_or_str", "4.5", "4.5"),
    ("num_or_null", "null", None),
    ("num_or_null", "0.25", 0.25),
    ("bool_or_str", "true", True),
    ("bool_or_str", "True", "True"),
    ("bool_or_str", "yes", "yes"),
    ("color", "007", "007"),
    ("color", "red", "red"),
    ("level", "2", 2),
    ("note", "42", "42"),
    ("unknown_param", "42", "42"),
    ("unknown_param", "true", "true"),
])
def test_values_typed_by_schema(prop, raw, expected):
    args = probe(**{prop: raw})
    assert args == {prop: expected} and type(args[prop]) is type(expected)


def test_arguments_are_valid_json_without_ascii_escapes():
    r = parse_assistant(call("write_file", path="données/été.txt", content="日本語 ✓ 😀"), TOOLS, thinking=False)
    arguments = r.tool_calls[0]["function"]["arguments"]
    assert "données/été.txt" in arguments and "😀" in arguments
    assert json.loads(arguments) == {"path": "données/été.txt", "content": "日本語 ✓ 😀"}


def test_multiline_values_keep_inner_newlines_and_lose_exactly_one_at_each_end():
    code = "def f():\n    return 1\n\n\nprint(f())"
    assert probe(s=code) == {"s": code}
    assert probe(s="\nblank line before and after\n") == {"s": "\nblank line before and after\n"}
    assert probe(s="") == {"s": ""}


@pytest.mark.parametrize("value", [
    "a < b and c > d",
    "x </parameter y",
    "closing tag </parameters> and </param> and </parameter_name>",
    "mid-line <parameter=fake> tag",
    "html: <div><p>hi</p></div>",
    "see </function> and </tool_call tag",
    'print("</parameter>") # a literal closing tag followed by more text',
])
def test_values_with_tag_lookalikes_stay_intact(value):
    assert probe(s=value) == {"s": value}
    assert probe(s=value, n="1") == {"s": value, "n": 1}


def test_missing_parameter_close_ends_at_next_parameter_or_function_end():
    text = ("<tool_call>\n<function=probe>\n<parameter=s>\nfirst\n<parameter=n>\n5\n</parameter>\n"
            "<parameter=note>\nlast\n</function>\n</tool_call>")
    assert args_of(parse_assistant(text, TOOLS, thinking=False)) == [("probe", {"s": "first", "n": 5,
                                                                                 "note": "last"})]


def test_unknown_tool_and_no_tools_give_raw_strings():
    text = call("mystery", a="1", b="true", c='{"k": 2}')
    raw = {"a": "1", "b": "true", "c": '{"k": 2}'}
    assert args_of(parse_assistant(text, TOOLS, thinking=False)) == [("mystery", raw)]
    assert args_of(parse_assistant(text, None, thinking=False)) == [("mystery", raw)]
    assert args_of(parse_assistant(call("get_weather", days="3"), None, thinking=False)) == [
        ("get_weather", {"days": "3"})]


def test_odd_tool_definitions_do_not_break_parsing():
    tools = [None, "x", {"function": "nope"}, {"name": "f", "parameters": "bad"}, {"name": "g"},
             {"type": "function", "function": {"name": "h", "parameters": {"properties": {"v": {"type": "weird"}}}}}]
    text = call("f", v="1") + call("g", v="1") + call("h", v="1")
    assert args_of(parse_assistant(text, tools, thinking=False)) == [("f", {"v": "1"}), ("g", {"v": "1"}),
                                                                     ("h", {"v": "1"})]


MALFORMED = [
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",                    # truncated in a value
    "<tool_call>\n<function=get_wea",                                                  # truncated in the name
    "<tool_call>\n<function=>\n</function>\n</tool_call>",                             # empty name
    "<tool_call>\n<function=f>\ngarbage\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function={{ tc.name }}>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>",  # debris
    "<tool_call>\n<function=f>\n<parameter=>\n1\n</parameter>\n</function>\n</tool_call>",   # empty key
    "<tool_call>\n<function=f>\n<parameter=a\n1\n</parameter>\n</function>\n</tool_call>",   # unclosed tag
]


@pytest.mark.parametrize("bad", MALFORMED)
@pytest.mark.parametrize("thinking", [False, True])
def test_malformed_calls_go_to_content_verbatim(bad, thinking):
    prefix = "\n</think>\n\n" if thinking else ""
    r = parse_assistant(prefix + "Before.\n\n" + bad, TOOLS, thinking=thinking)
    assert r == ChatResult("Before.\n\n" + bad.strip(), None, [])
    # an unterminated block is cut off by the next <tool_call>, which still parses
    r = parse_assistant(prefix + "Before.\n\n" + bad + "\n" + call("get_weather", city="Oslo"), TOOLS, thinking)
    assert r.content == "Before.\n\n" + bad.strip()
    assert args_of(r) == [("get_weather", {"city": "Oslo"})]


def test_truncated_call_inside_reasoning_goes_to_content():
    text = "Need data.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    r = parse_assistant(text, TOOLS)
    assert r == ChatResult("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", "Need data.", [])


@pytest.mark.parametrize("text, content", [
    ("Use the <tool_call> token to call tools.", "Use the <tool_call> token to call tools."),
    ("<tool_call>\n\n", "<tool_call>"),
    ("<tool_call>\n<func", "<tool_call>\n<func"),
    ("a </tool_call> b", "a </tool_call> b"),
])
def test_tool_call_tag_without_function_is_literal_text(text, content):
    assert parse_assistant(text, TOOLS, thinking=False) == ChatResult(content, None, [])


def test_no_tag_ever_leaks_into_arguments():
    for text in CORPUS_TEXTS + [bad for bad in MALFORMED]:
        for thinking in (True, False):
            for c in parse_assistant(text, TOOLS, thinking=thinking).tool_calls:
                args = json.loads(c["function"]["arguments"])
                assert isinstance(args, dict) and "<function=" not in c["function"]["arguments"]
                assert "<parameter=" not in c["function"]["name"] and "\n" not in c["function"]["name"]


# ---- streaming ------------------------------------------------------------------------------------------

CORPUS = [   # (text, thinking)
    ("The user says hi.\n</think>\n\nHello there!", True),
    ("\n</think>\n\nShort answer.", True),
    ("Only reasoning, cut off mid-sen", True),
    ("Reason.\n</think>\n\nLet me check.\n\n" + call("get_weather", city="Paris", days="3"), True),
    ("I will call it.\n\n" + call("get_weather", city="Paris") + "\n" + call("get_weather", city="Rome"), True),
    ("Look up.\n" + call("get_weather", city="Bern") + "\nThen answer.\n</think>\n\nBern is sunny.", True),
    ("<think>\nold template\n</think>\n\nok", True),
    ("Plain content with <b>tags</b> and a < sign.", False),
    (call("probe", s="007", n="42", x="2.5", flag="true", obj='{"a": [1, {"b": null}]}', arr="[1, 2]"), False),
    (call("write_file", path="a.py", content="x = '</parameter>'\n\nprint(x)\n") + "\nWritten.", False),
    ("Answer </think> with a literal close tag and <tool_call> literal too.", False),
    ("Reasoning <think> literal.\n</think>\n\n\n\nContent.\n\n\n" + call("probe", s="\n\nspaced\n\n"), True),
    ("Calling.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", True),
    ("Bad call:\n<tool_call>\n<function=f>\njunk\n</function>\n</tool_call>\nafter", False),
    ("ユニコード思考 😀\n</think>\n\n答え: «ça va» — ✓\n" + call("write_file", path="é/ü.txt", content="中文\n内容"), True),
    ("x</thi", True),
    ("answer then <tool_ca", False),
    ("R\n</think>\n\nC\n<tool_call>\n<function=probe>\n<parameter=s>\nno close\n<parameter=n>\n3\n</function>\n"
     "</tool_call>", True),
    ("   \n\n  ", True),
    ("\n<think>", False),
    ("<tool_call>  \n <function=get_weather><parameter=city>X</parameter></tool_call><tool_call>oops</tool_call>",
     False),
]
CORPUS_TEXTS = [text for text, _ in CORPUS]


def client_merge(deltas: list[dict]) -> dict:
    """An OpenAI client's merge, written independently of merge_deltas; checks each delta's shape."""
    merged = {"reasoning_content": "", "content": "", "tool_calls": {}}
    for delta in deltas:
        [(key, value)] = delta.items()
        if key == "tool_calls":
            [part] = value
            assert set(part) == {"index", "id", "type", "function"} and part["type"] == "function"
            assert ID_RE.fullmatch(part["id"])
            entry = merged["tool_calls"].setdefault(part["index"], ["", ""])
            entry[0] += part["function"]["name"]
            entry[1] += part["function"]["arguments"]
        else:
            assert key in ("reasoning_content", "content") and isinstance(value, str) and value
            merged[key] += value
    calls = merged.pop("tool_calls")
    assert sorted(calls) == list(range(len(calls)))
    return {**merged, "tool_calls": [tuple(calls[i]) for i in sorted(calls)]}


def whole(result: ChatResult) -> dict:
    return {"reasoning_content": result.reasoning_content or "", "content": result.content or "",
            "tool_calls": [(c["function"]["name"], c["function"]["arguments"]) for c in result.tool_calls]}


def stream(chunks: list[str], thinking: bool) -> tuple[list[dict], AssistantStreamParser]:
    parser = AssistantStreamParser(TOOLS, thinking)
    deltas = [d for chunk in chunks for d in parser.feed(chunk)]
    return deltas + parser.finish(), parser


def check_chunks(text: str, thinking: bool, chunks: list[str], expected: dict) -> None:
    assert "".join(chunks) == text
    deltas, parser = stream(chunks, thinking)
    assert client_merge(deltas) == expected, chunks
    assert whole(parser.result()) == expected


def test_corpus_is_varied_enough():
    assert len(CORPUS) >= 15
    assert {thinking for _, thinking in CORPUS} == {True, False}


@pytest.mark.parametrize("text, thinking", CORPUS)
def test_stream_equals_whole_for_every_two_chunk_split(text, thinking):
    expected = whole(parse_assistant(text, TOOLS, thinking))
    for i in range(len(text) + 1):
        check_chunks(text, thinking, [text[:i], text[i:]], expected)


@pytest.mark.parametrize("text, thinking", CORPUS)
def test_stream_equals_whole_one_character_at_a_time(text, thinking):
    check_chunks(text, thinking, list(text), whole(parse_assistant(text, TOOLS, thinking)))


@pytest.mark.parametrize("text, thinking", CORPUS)
def test_stream_equals_whole_for_three_chunk_splits_around_markers(text, thinking):
    """Every pair of cut points within ±12 characters of each `<`: markers cut into three pieces."""
    expected = whole(parse_assistant(text, TOOLS, thinking))
    near = sorted({j for i, ch in enumerate(text) if ch == "<" for j in range(i, min(i + 13, len(text) + 1))})
    for a in near:
        for b in near:
            if a < b <= a + 12:
                check_chunks(text, thinking, [text[:a], text[a:b], text[b:]], expected)


def test_stream_equals_whole_random_chunkings():
    rng = random.Random(1234)
    for text, thinking in CORPUS:
        expected = whole(parse_assistant(text, TOOLS, thinking))
        for _ in range(150):
            cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(1, min(12, len(text) + 1))))
            chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
            check_chunks(text, thinking, chunks, expected)


def test_fuzz_random_marker_soup_never_raises_and_streams_consistently():
    pieces = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<function=f>", "<function=probe>",
              "</function>", "<parameter=n>", "<parameter=s>", "</parameter>", "\n", "\n\n", " ", "7", "x",
              "<", ">", "</", "é", "null", "{\"a\": 1}"]
    rng = random.Random(99)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        for thinking in (True, False):
            expected = whole(parse_assistant(text, TOOLS, thinking))
            cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
            chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
            check_chunks(text, thinking, chunks, expected)
            check_chunks(text, thinking, list(text), expected)


def test_stream_emits_promptly_and_holds_only_possible_markers():
    p = AssistantStreamParser(TOOLS, thinking=True)
    assert p.feed("Thinking about <b") == [{"reasoning_content": "Thinking about <b"}]
    assert p.feed(" more </thi") == [{"reasoning_content": " more"}]      # " </thi" may be the marker
    assert p.feed("nk>\n\nAns") == [{"content": "Ans"}]
    assert p.feed("wer\n\n") == [{"content": "wer"}]                       # trailing whitespace held
    assert p.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n") == []
    assert p.feed("</function>\n</tool_call>") == []          # more could follow that makes it a value
    [delta] = p.finish()
    [part] = delta["tool_calls"]
    assert part["index"] == 0 and part["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert p.result().content == "Answer" and p.result().reasoning_content == "Thinking about <b more"


@pytest.mark.parametrize("text, thinking, expected", [
    ("answer</thi", False, ChatResult("answer</thi", None, [])),
    ("reasoning</thi", True, ChatResult(None, "reasoning</thi", [])),
    ("done <tool_call>\n", False, ChatResult("done <tool_call>", None, [])),
    ("\n<thi", True, ChatResult(None, "<thi", [])),
    ("<think", False, ChatResult("<think", None, [])),
])
def test_finish_flushes_held_back_text(text, thinking, expected):
    p = AssistantStreamParser(TOOLS, thinking)
    held = p.feed(text)
    assert merge_deltas(held + p.finish()) == expected
    assert p.result() == expected


def test_tool_call_indices_count_up_and_feed_after_finish_fails():
    text = call("get_weather", city="A") + "\n" + call("get_weather", city="B")
    deltas, parser = stream([text], thinking=False)
    assert [d["tool_calls"][0]["index"] for d in deltas] == [0, 1]
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_merge_deltas_merges_incremental_tool_call_fragments():
    deltas = [{"content": "a"}, {"tool_calls": [{"index": 0, "id": "call_" + "0" * 24, "type": "function",
                                                 "function": {"name": "f", "arguments": '{"x": '}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, {"content": "b"}]
    r = merge_deltas(deltas)
    assert r.content == "ab" and r.reasoning_content is None
    assert r.tool_calls == [{"id": "call_" + "0" * 24, "type": "function",
                             "function": {"name": "f", "arguments": '{"x": 1}'}}]


# ---- the shapes models emit besides the template's (cases of the kinds peers test, in our own words) -------

WRITE = {"path": "a.py"}
DEBRIS = "<tool_call>\n<function={{ tc.name }}>\n<parameter={{ k }}>\n{{ v }}\n</parameter>\n</function>\n</tool_call>"
EXAMPLE = call("get_weather", city="X")


@pytest.mark.parametrize("text, calls, content", [
    # the opening <tool_call> skipped, with or without the closing one
    ("<function=get_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>",
     [("get_weather", {"city": "Dallas"})], None),
    ("On it.\n\n<function=get_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>\n</tool_call>",
     [("get_weather", {"city": "Dallas"})], "On it."),
    ("<function=get_weather>\n<parameter=city>\nA\n</parameter>\n</function>\n"
     "<function=get_weather>\n<parameter=city>\nB\n</parameter>\n</function>",
     [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})], None),
    # ... but not mid-line, nor for a tool that was not given
    ("see <function=get_weather>\n<parameter=city>\nX\n</parameter>\n</function>", [],
     "see <function=get_weather>\n<parameter=city>\nX\n</parameter>\n</function>"),
    ("<function=rm_rf>\n<parameter=city>\nX\n</parameter>\n</function>", [],
     "<function=rm_rf>\n<parameter=city>\nX\n</parameter>\n</function>"),
    # </tool_call> missing before the next call
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nTokyo\n</parameter>\n</function>\n"
     + call("get_weather", city="Paris"), [("get_weather", {"city": "Tokyo"}), ("get_weather", {"city": "Paris"})],
     None),
    # malformed parameter closers
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nShanghai\n</parameter1>\n<parameter=days>\n3\n"
     "</parameter>\n</function>\n</tool_call>", [("get_weather", {"city": "Shanghai", "days": 3})], None),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nShanghai\n</parameter_function>\n</function>\n"
     "</tool_call>", [("get_weather", {"city": "Shanghai"})], None),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nShanghai\n</parameter\n</function>\n</tool_call>",
     [("get_weather", {"city": "Shanghai"})], None),
    # a closer-like tag that is part of the value stays in it
    ("<tool_call>\n<function=write_file>\n<parameter=content>\n<x></parameters>\n</parameter>\n</function>\n"
     "</tool_call>", [("write_file", {"content": "<x></parameters>"})], None),
    # template debris is not a call; the real one after it is
    (DEBRIS + "\n" + call("write_file", path="a.py"), [("write_file", WRITE)], DEBRIS),
    # text between two calls stays text
    (call("get_weather", city="A") + "\nand also\n" + call("get_weather", city="B"),
     [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})], "and also"),
    # an indented layout (never the template's): values stripped; the template's layout keeps indentation
    ("<tool_call>\n  <function=get_weather>\n    <parameter=city>\n      New York\n    </parameter>\n"
     "  </function>\n</tool_call>", [("get_weather", {"city": "New York"})], None),
    (call("write_file", content="    indented\n  code\n"), [("write_file", {"content": "    indented\n  code\n"})], None),
    # an example call inside a Markdown code fence is shown, not made
    ("Format:\n```xml\n" + EXAMPLE + "\n```\nThat is all.", [], "Format:\n```xml\n" + EXAMPLE + "\n```\nThat is all."),
])
def test_shapes_besides_the_template(text, calls, content):
    for thinking in (False, True):
        prefix = "plan\n</think>\n\n" if thinking else ""
        r = parse_assistant(prefix + text, TOOLS, thinking=thinking)
        assert args_of(r) == calls and r.content == content, (thinking, r)
        check_every_split(prefix + text, thinking, whole(r))


SOURCE_WITH_TAGS = [
    # a file whose lines are parameter tags of this very tool
    'T = """\n</parameter>\n<parameter=path>\nevil.py\n</parameter>\n"""',
    # a whole example call, of the same tool
    "doc = '''\n" + call("write_file", path="other.py", content="hello") + "\n'''",
    # tag names inside string literals, one per line
    'ends = [\n    "<tool_call>",\n    "</parameter>",\n    "</function>",\n]',
    # an unbalanced closing tag inside a string
    'x = "</tool_call>"\ny = 1',
]


@pytest.mark.parametrize("source, first", [(s, first) for s in SOURCE_WITH_TAGS for first in (True, False)
                                           if (s, first) != (SOURCE_WITH_TAGS[0], False)])
def test_values_may_hold_tag_like_text(source, first):
    """A file being written that quotes the call syntax: the value is the whole file, no key is added,
    and no call inside it is made, whichever parameter comes first. (Not tested: the first source
    written before `path`: its `</parameter>` line followed by `<parameter=path>` reads as the real end
    of the value just as well, and the earliest such end is taken.)"""
    params = {"path": "a.py", "content": source} if first else {"content": source, "path": "a.py"}
    text = "Writing it.\n\n" + call("write_file", **params)
    r = parse_assistant(text, TOOLS, thinking=False)
    assert args_of(r) == [("write_file", {"path": "a.py", "content": source})] and r.content == "Writing it."
    check_every_split(text, False, whole(r))


def check_every_split(text: str, thinking: bool, expected: dict) -> None:
    """Streamed in two pieces cut at every position, and one character at a time: the whole-text result."""
    for i in range(len(text) + 1):
        check_chunks(text, thinking, [text[:i], text[i:]], expected)
    check_chunks(text, thinking, list(text), expected)


def test_truncated_call_then_the_call_again():
    """A call cut off in a value and then written again: the second is the call, the first is content."""
    broken = "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    r = parse_assistant(broken + "\n" + call("get_weather", city="Paris"), TOOLS, thinking=False)
    assert args_of(r) == [("get_weather", {"city": "Paris"})] and r.content == broken


def test_adversarial_backtracking_is_bounded():
    import time

    text = ("<tool_call>\n<function=write_file>\n" + "<parameter=content>\n</parameter>\n" * 3000
            + "</tool_call>x" * 300)
    t0 = time.perf_counter()
    parse_assistant(text, TOOLS, thinking=False)
    assert time.perf_counter() - t0 < 20
