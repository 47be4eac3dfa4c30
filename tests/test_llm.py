"""LLM.generate / logits behaviour and SamplingParams."""
from __future__ import annotations

import json

import pytest
import torch

from qwen36 import LLM, SamplingParams
from qwen36.sampling import Sampler


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("ratio2", seed=9), quantization=None)


def test_greedy_is_argmax_of_full_forward(llm):
    ids = [5, 17, 300, 2, 44]
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12))
    seq = list(ids)
    for tok in out.token_ids:
        assert tok == int(llm.logits(seq)[-1].argmax())
        seq.append(tok)
    assert len(out.token_ids) == 12 and out.finish_reason == "length" and out.prompt_token_ids == ids


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(temperature=1.0, max_tokens=20, seed=1234)
    a, b = llm.generate([1, 2, 3], p), llm.generate([1, 2, 3], p)
    c = llm.generate([1, 2, 3], SamplingParams(temperature=1.0, max_tokens=20, seed=99))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_token_id(llm):
    greedy = llm.generate([7, 8, 9], SamplingParams(temperature=0, max_tokens=10)).token_ids
    stop_at = greedy[4]
    first = greedy.index(stop_at)
    out = llm.generate([7, 8, 9], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))
    assert out.token_ids == greedy[:first] and out.finish_reason == "stop"


def test_stop_string_across_tokens(llm):
    full = llm.generate([7, 8, 9], SamplingParams(temperature=0, max_tokens=10))
    text = full.text
    cut = len(llm.tokenizer.decode(full.token_ids[:3]))
    stop = text[cut - 2:cut + 2]                                               # straddles a token boundary
    out = llm.generate([7, 8, 9], SamplingParams(temperature=0, max_tokens=10, stop=[stop]))
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]


def test_text_prompt(checkpoint):
    demo = LLM(checkpoint("demo"), quantization=None)
    out = demo.generate("Hello there, 世界!", SamplingParams(temperature=0, max_tokens=6))
    assert out.prompt_token_ids == demo.tokenizer.encode("Hello there, 世界!")
    assert len(out.token_ids) == 6 and out.text == demo.tokenizer.decode(out.token_ids)


def test_text_prompt_outside_small_vocab(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=3))


def test_generation_config_defaults(llm):
    p = llm.default_sampling_params(max_tokens=5)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (1.0, 20, 0.95, 5)
    assert llm.eos_token_ids == (248046, 248044)


@pytest.mark.parametrize("bad", [[], [512], [-1]])  # empty, past the vocabulary, negative
def test_bad_token_ids(llm, bad):
    with pytest.raises(ValueError, match="token"):
        llm.logits(bad)


def test_bad_constructor_arguments(checkpoint):
    path = checkpoint("ratio2", seed=9)
    with pytest.raises(ValueError, match="dtype='float64'"):
        LLM(path, dtype="float64", quantization=None)
    with pytest.raises(ValueError, match="quantization='int3'"):
        LLM(path, quantization="int3")


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -2),
                                         ("min_p", 2), ("max_tokens", 0), ("repetition_penalty", 0),
                                         ("presence_penalty", 3), ("stop", [""]), ("seed", "x")])
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_sampler_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    def probs(**kw):
        return Sampler(SamplingParams(**kw)).probs(logits.clone())
    torch.testing.assert_close(probs(), torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert probs(top_k=2)[2:].sum() == 0 and torch.isclose(probs(top_k=2)[0], torch.tensor(0.5 / 0.7))
    assert (probs(top_p=0.6) > 0).tolist() == [True, True, False, False, False]
    assert (probs(top_p=0.45) > 0).tolist() == [True, False, False, False, False]
    assert (probs(min_p=0.25) > 0).tolist() == [True, True, True, False, False]
    assert probs(temperature=0.5)[0] > 0.5


def test_sampler_penalties():
    s = Sampler(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25))
    logits = torch.tensor([1.0, -1.0, 2.0, 0.0])
    out = s.penalize(logits.clone(), prompt_ids=[0], output_ids=[1, 1, 2])
    # rep: 0 -> 0.5, 1 -> -2, 2 -> 1; then presence/frequency on outputs 1 (x2) and 2 (x1)
    torch.testing.assert_close(out, torch.tensor([0.5, -2.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 0.0]))


def test_chat_is_template_generate_parse(checkpoint):
    from qwen36 import parse_assistant, render_chat

    demo = LLM(checkpoint("demo"), quantization=None)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    p = SamplingParams(temperature=0, max_tokens=8)
    for thinking in (True, False):
        got = demo.chat(msgs, p, enable_thinking=thinking)
        raw = demo.generate(render_chat(msgs, enable_thinking=thinking), p)
        want = parse_assistant(raw.text, thinking=thinking)
        assert (got.content, got.reasoning_content, got.tool_calls) == (want.content, want.reasoning_content, [])
        assert got.finish_reason == "length"
    assert demo.chat_template.source == "checkpoint"                 # the demo ships chat_template.jinja


def test_chat_tool_calls_typed(checkpoint, monkeypatch):
    """The output side of LLM.chat: a tool call in Qwen's XML comes back in OpenAI shape, typed by schema."""
    from qwen36.llm import Completion

    demo = LLM(checkpoint("demo"), quantization=None)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    raw = ("Need weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
           "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
    seen = {}

    def fake_generate(prompt, params=None):
        seen["prompt"] = demo.tokenizer.decode(prompt.ids)
        return Completion([1], "stop", [1], lambda ids: raw)
    monkeypatch.setattr(demo, "generate", fake_generate)
    r = demo.chat([{"role": "user", "content": "Weather in Paris?"}], tools=tools)
    assert '"name": "get_weather"' in seen["prompt"] and seen["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    assert r.reasoning_content == "Need weather." and r.content is None and r.finish_reason == "tool_calls"
    (call,) = r.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}


def test_max_num_batched_tokens_sets_the_step_budget(checkpoint):
    """The step's token budget (vLLM's max_num_batched_tokens), a quarter of it for prompts while others
    decode; outputs do not depend on it."""
    path = checkpoint("ratio2", seed=9)
    small = LLM(path, quantization=None, max_num_batched_tokens=32)
    s = small.engine().scheduler
    assert (s.max_num_batched_tokens, s.busy_prefill) == (32, 16)
    prompt = list(range(3, 100))
    params = SamplingParams(temperature=0, max_tokens=6)
    assert small.generate(prompt, params).token_ids == LLM(path, quantization=None).generate(prompt, params).token_ids
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(path, max_num_batched_tokens=0)
