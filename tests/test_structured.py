"""Structured output on random weights (every valid answer must come from the constraint): JSON schemas,
strict tool calls, the thinking budget; the reasoning stays free; unconstrained requests are unchanged."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from test_server import KEY, launch, stop

from qwen36 import LLM, SamplingParams
from qwen36.parsers import parse_assistant

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "email": {"type": ["string", "null"], "maxLength": 16},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "integer"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "age", "email", "address"], "additionalProperties": False},
    "list": {"type": "object", "properties": {
        "kind": {"const": "todo"},
        "items": {"type": "array", "minItems": 2, "maxItems": 3,
                  "items": {"type": "object", "properties": {"done": {"type": "boolean"},
                                                             "level": {"enum": ["low", "high", 3]}},
                            "required": ["done", "level"], "additionalProperties": False}}},
        "required": ["kind", "items"], "additionalProperties": False},
    "number": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1}},
               "required": ["x"], "additionalProperties": False},
}
MSG = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("demo"), quantization=None)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("thinking", [False, True])
def test_every_answer_validates(llm, name, thinking):
    """Temperature 0.9, three seeds, thinking off, and on under a budget: the content is exactly JSON
    that validates, the answer ends with stop, and the reasoning (free text) holds none of it."""
    schema = SCHEMAS[name]
    for seed in range(3):
        p = SamplingParams(temperature=0.9, seed=seed, max_tokens=160, json_schema=schema,
                           thinking_token_budget=6 if thinking else None)
        r = llm.chat(MSG, p, enable_thinking=thinking)
        assert r.finish_reason == "stop", r
        jsonschema.validate(json.loads(r.content), schema)
        if thinking:
            assert r.reasoning_content and "{" not in (r.reasoning_content or "")[-1:]


def test_any_json_object_and_budget_without_schema(llm):
    # any object: its keys and strings are unbounded, so random weights may run out of tokens first
    for seed in range(3):
        r = llm.chat(MSG, SamplingParams(temperature=0.9, seed=seed, max_tokens=60, json_schema=True),
                     enable_thinking=False)
        assert r.content.startswith("{")
        assert r.finish_reason == "length" or isinstance(json.loads(r.content), dict)
    # a budget alone ends the reasoning after that many tokens and the answer goes on freely
    out = llm.generate(llm.encode_chat(MSG), SamplingParams(temperature=0, max_tokens=12, thinking_token_budget=4))
    tok = llm.tokenizer
    forced = [tok.token_id("</think>")] + tok.encode("\n\n")
    assert out.token_ids[4:4 + len(forced)] == forced
    assert parse_assistant(out.text).reasoning_content is not None


def test_unconstrained_requests_in_the_same_batch_are_unchanged(llm):
    engine = llm.engine()
    prompt = llm.encode_chat(MSG).ids
    plain = SamplingParams(temperature=0, max_tokens=10)
    alone = llm.generate(prompt, plain).token_ids
    rids = [engine.add_request(prompt, SamplingParams(temperature=0.9, seed=s, max_tokens=40,
                                                       json_schema=SCHEMAS["number"])) for s in range(2)]
    mixed = engine.add_request(prompt, plain)
    tokens = {rid: [] for rid in rids + [mixed]}
    while engine.has_work():
        for o in engine.step():
            tokens[o.request_id] += o.token_ids
    assert tokens[mixed] == alone


def test_unsatisfiable_within_max_tokens_ends_with_length(llm):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 200}}, "required": ["s"]}
    r = llm.chat(MSG, SamplingParams(temperature=0.9, seed=0, max_tokens=8, json_schema=schema), enable_thinking=False)
    assert r.finish_reason == "length"


def test_bad_schema_is_a_value_error(llm):
    with pytest.raises(ValueError, match="schema"):
        llm.chat(MSG, SamplingParams(max_tokens=4, json_schema={"type": "object", "properties": {"a": {"type": 5}}}))


# ---- through the server ----------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                     "units": {"enum": ["c", "f"]}},
    "required": ["city", "days"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "search", "strict": True, "parameters": {
             "type": "object", "properties": {"q": {"type": "string", "minLength": 1, "maxLength": 20},
                                              "limit": {"type": ["integer", "null"]}},
             "required": ["q", "limit"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("structured") / "server.log"
    proc, base = launch(checkpoint("demo"), log, "--api-key", KEY, "--max-model-len", "1024")
    c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    c.test_base = base
    yield c
    stop(proc)
    assert "Traceback" not in log.read_text()


def test_response_format_whole_and_streamed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMAS["person"], "strict": True}}
    kw = dict(model="m", messages=MSG, max_tokens=160, temperature=0.9, seed=3, response_format=fmt,
              extra_body={"thinking_token_budget": 5})
    whole = client.chat.completions.create(**kw).choices[0]
    jsonschema.validate(json.loads(whole.message.content), SCHEMAS["person"])
    assert whole.finish_reason == "stop" and whole.message.model_extra.get("reasoning_content")
    chunks = list(client.chat.completions.create(stream=True, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.message.content


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}, "auto"])
def test_strict_tool_calls_validate(client, choice):
    """tool_choice required / named, or a tool marked strict under auto: the arguments our parser
    returns validate against the tool's schema, and finish_reason is tool_calls."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(2):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS,
                                           tool_choice=choice, max_tokens=120, temperature=0.9, seed=seed,
                                           parallel_tool_calls=False,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        c = r.choices[0]
        if choice == "auto" and not c.message.tool_calls:          # auto: the model may answer in text
            continue
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        for call in c.message.tool_calls:
            if isinstance(choice, dict):
                assert call.function.name == "get_weather"
            if choice == "auto":
                assert call.function.name == "search"              # only strict tools are constrained
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_bad_schemas_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSG, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSG, max_tokens=4, response_format={"type": "json_schema"})
    assert e.value.body["param"] == "response_format"


def test_anthropic_and_responses_formats(client):
    """output_config.format on /v1/messages and text.format on /v1/responses take the same schemas, with
    thinking on under budget_tokens / reasoning.effort low."""
    import anthropic

    schema = SCHEMAS["list"]
    claude = anthropic.Anthropic(base_url=client.test_base, api_key=KEY, max_retries=0, timeout=120)
    m = claude.messages.create(model="m", max_tokens=160, messages=MSG, thinking={"type": "enabled", "budget_tokens": 5},
                               output_config={"format": {"type": "json_schema", "schema": schema}},
                               extra_body={"temperature": 0.9})
    [thinking, text] = m.content
    assert thinking.type == "thinking" and m.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text.text), schema)
    r = client.responses.create(model="m", input="Answer in JSON.", max_output_tokens=300, temperature=0.9,
                                reasoning={"effort": "none"},
                                text={"format": {"type": "json_schema", "name": "todo", "schema": schema}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)


def test_without_tokenizer_json_structured_output_is_refused_clearly(checkpoint, tmp_path):
    """A checkpoint with only vocab.json (no tokenizer.json for llguidance) still chats; a schema is a
    ValueError saying what is missing, never a crash mid-generation."""
    src = checkpoint("demo")
    for f in src.iterdir():
        if f.name != "tokenizer.json":
            (tmp_path / f.name).symlink_to(f)
    llm = LLM(tmp_path, quantization=None)
    assert llm.engine().grammar is None
    assert llm.chat(MSG, SamplingParams(temperature=0, max_tokens=2)).finish_reason == "length"
    with pytest.raises(ValueError, match="tokenizer.json"):
        llm.chat(MSG, SamplingParams(max_tokens=2, json_schema=True))
