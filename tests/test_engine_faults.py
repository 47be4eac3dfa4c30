"""A failing step fails only the requests it must: the others finish with the tokens they have alone, and
nothing leaks. Also: stop strings, logit_bias and stop_token_ids cost per token no more than they must,
with the results they had."""
from __future__ import annotations

import random

import pytest
import torch

from qwen36 import LLM, SamplingParams
from qwen36.engine import MAX_FORWARD_FAILURES, Engine
from qwen36.sampling import Sampler, StopMatcher


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("ratio4-irregular", seed=13), quantization=None)


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, **kw)


PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 7, 300, 2, 9], [77] * 6]
LENS = [9, 7, 8, 6]


@pytest.fixture(scope="module")
def alone(llm):
    return [llm.generate(p, greedy(n)).token_ids for p, n in zip(PROMPTS, LENS)]


def run(engine, rids):
    """Step until done -> ({rid: tokens}, {rid: finish_reason})."""
    toks, reasons = {r: [] for r in rids}, {}
    for _ in range(500):
        if not engine.has_work():
            break
        for o in engine.step():
            toks[o.request_id] += o.token_ids
            if o.finished:
                assert o.request_id not in reasons, "a request finished twice"
                reasons[o.request_id] = o.finish_reason
    assert not engine.has_work()
    return toks, reasons


def assert_nothing_leaks(engine, slots):
    s = engine.scheduler
    assert not s.running and not s.waiting and not engine.requests
    assert s.num_available == s.num_blocks and sorted(s.free_slots) == list(range(slots))
    if engine.prefix is not None:                     # every reserved snapshot slot is free or a snapshot
        assert len(engine.prefix.free_slots) + engine.prefix.num_snapshots == engine.snapshots_total


def new_engine(llm, slots=4, **kw):
    e = Engine(llm.model, None, max_num_seqs=slots, kv_cache_memory=1 << 24, **kw)
    e.snapshots_total = len(e.prefix.free_slots) if e.prefix is not None else 0
    return e


def failing_forward(monkeypatch, model, when):
    """model.forward raises RuntimeError whenever when(batch) is true; returns [(slots, raised)] per call."""
    real, calls = model.forward, []

    def forward(x, batch, cache, **kw):
        raised = bool(when(batch))
        calls.append((tuple(batch.slots), raised))
        if raised:
            raise RuntimeError("injected forward failure")
        return real(x, batch, cache, **kw)
    monkeypatch.setattr(model, "forward", forward)
    return calls


# ---------------------------------------------------------------- a request's own work fails
def test_a_sampler_that_raises_fails_only_its_request(llm, alone):
    engine = new_engine(llm)
    rids = [engine.add_request(p, greedy(n)) for p, n in zip(PROMPTS, LENS)]
    bad = engine.requests[rids[1]]
    real, calls = bad.sampler, []

    def sampler(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected sampler failure")
        return real(*args, **kw)
    bad.sampler = sampler
    toks, reasons = run(engine, rids)
    assert reasons[rids[1]] == "error" and toks[rids[1]] == alone[1][:2]
    for i in (0, 2, 3):
        assert toks[rids[i]] == alone[i] and reasons[rids[i]] == "length"
    assert engine.stats.failed_requests == 1 and engine.stats.failed_passes == 0
    assert_nothing_leaks(engine, 4)


def test_a_stop_matcher_that_raises_fails_only_its_request(llm, alone):
    assert llm.tokenizer is not None
    engine = Engine(llm.model, llm.tokenizer, max_num_seqs=2, kv_cache_memory=1 << 24)
    good = engine.add_request(PROMPTS[0], greedy(LENS[0]))
    bad = engine.add_request(PROMPTS[1], greedy(LENS[1], stop=["zzz"]))

    class Broken(StopMatcher):
        def search(self, text, checked):
            raise ValueError("injected")
    engine.requests[bad].stops = Broken(["zzz"])
    toks, reasons = run(engine, [good, bad])
    assert reasons == {good: "length", bad: "error"} and toks[good] == alone[0] and toks[bad] == []
    assert engine.scheduler.num_available == engine.scheduler.num_blocks


# ---------------------------------------------------------------- a batched pass fails
def test_a_forward_that_fails_once_is_recomputed_to_the_same_tokens(llm, alone, monkeypatch):
    engine = new_engine(llm)
    rids = [engine.add_request(p, greedy(n)) for p, n in zip(PROMPTS, LENS)]
    n = {"calls": 0}

    def once(batch):
        n["calls"] += 1
        return n["calls"] == 4                        # a decode step of all four
    calls = failing_forward(monkeypatch, llm.model, once)
    toks, reasons = run(engine, rids)
    assert [len(slots) for slots, raised in calls if raised] == [4]
    assert [toks[r] for r in rids] == alone and set(reasons.values()) == {"length"}
    assert engine.stats.failed_passes == 1 and engine.stats.failed_requests == 0
    assert engine.scheduler.num_preemptions == 4
    assert_nothing_leaks(engine, 4)


def test_a_forward_failing_whenever_one_request_is_in_it_fails_that_one(llm, alone, monkeypatch):
    engine = new_engine(llm)
    rids = [engine.add_request(p, greedy(n)) for p, n in zip(PROMPTS, LENS)]
    culprit = rids[2]

    def with_culprit(batch):
        r = engine.requests.get(culprit)
        return r is not None and r.seq.slot in batch.slots and len(r.output_ids) >= 3
    calls = failing_forward(monkeypatch, llm.model, with_culprit)
    toks, reasons = run(engine, rids)
    assert reasons[culprit] == "error" and toks[culprit] == alone[2][:3]
    for i in (0, 1, 3):
        assert toks[rids[i]] == alone[i] and reasons[rids[i]] == "length"
    # the failed batch's sequences were retried one at a time: the culprit failed alone
    first, second = [i for i, (_, raised) in enumerate(calls) if raised]
    assert len(calls[first][0]) == 4 and len(calls[second][0]) == 1
    assert all(len(slots) == 1 for slots, _ in calls[first + 1:second])
    assert engine.stats.failed_passes == 2 and engine.stats.failed_requests == 1
    assert_nothing_leaks(engine, 4)


def test_a_request_in_too_many_failed_batches_fails(llm, monkeypatch):
    """Failures that never happen alone (e.g. a batch too big to run) still end: a request in
    MAX_FORWARD_FAILURES failed passes fails, whatever passed in between."""
    engine = new_engine(llm, slots=2)
    rids = [engine.add_request(p, greedy(30)) for p in PROMPTS[:2]]
    failing_forward(monkeypatch, llm.model, lambda batch: len(batch.slots) > 1)
    toks, reasons = run(engine, rids)
    assert set(reasons.values()) == {"error"}
    assert engine.stats.failed_passes == MAX_FORWARD_FAILURES and engine.stats.failed_requests == 2
    assert all(len(t) == MAX_FORWARD_FAILURES - 1 for t in toks.values())   # a token alone after each failure
    assert_nothing_leaks(engine, 2)


def test_forward_failure_with_prefix_cache_snapshots_leaks_no_snapshot_slot(llm, monkeypatch):
    """A prefill chunk that reserved snapshot slots and failed gives them back; the retry is exact."""
    long = [(7 * i) % 500 + 1 for i in range(150)]
    want = llm.generate(long, greedy(5)).token_ids
    engine = new_engine(llm, slots=2, max_num_batched_tokens=64, snapshot_every=32, prefix_cache_memory=1 << 24)
    assert engine.prefix is not None and engine.snapshots_total > 0
    rid = engine.add_request(long, greedy(5))
    n = {"calls": 0}

    def second(batch):
        n["calls"] += 1
        return n["calls"] == 2
    failing_forward(monkeypatch, llm.model, second)
    toks, reasons = run(engine, [rid])
    assert toks[rid] == want and reasons[rid] == "length"
    assert engine.stats.failed_passes == 1
    assert_nothing_leaks(engine, 2)


def test_an_mtp_head_that_fails_once_keeps_the_output(checkpoint, monkeypatch):
    from qwen36.loader import load_model
    model = load_model(checkpoint("ratio2", seed=3), mtp=True)[1]
    prompts = [[9, 10, 11, 12], [200, 201, 202]]
    plain = Engine(model, None, max_num_seqs=2, kv_cache_memory=1 << 24)
    want = [llm_run(plain, p) for p in prompts]
    engine = Engine(model, None, max_num_seqs=2, kv_cache_memory=1 << 24,
                    speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    rids = [engine.add_request(p, greedy(8)) for p in prompts]
    real, n = model.draft, {"calls": 0}

    def draft(*args, **kw):
        n["calls"] += 1
        if n["calls"] == 3:
            raise RuntimeError("injected MTP failure")
        return real(*args, **kw)
    monkeypatch.setattr(model, "draft", draft)
    toks, reasons = run(engine, rids)
    assert [toks[r] for r in rids] == want and set(reasons.values()) == {"length"}
    assert engine.stats.failed_passes == 1 and engine.scheduler.num_preemptions >= 1
    assert engine.scheduler.num_available == engine.scheduler.num_blocks


def llm_run(engine, prompt):
    rid = engine.add_request(prompt, greedy(8))
    toks, _ = run(engine, [rid])
    return toks[rid]


# ---------------------------------------------------------------- stop strings: same results, less work
def old_find_stop(text, stops, released):
    """The engine's stop search before StopMatcher: every stop string, searched from `released - max + 1`."""
    if not stops:
        return None
    lo = max(0, released - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
    return min(hits) if hits else None


def old_stop_at(text, stops, at):
    return max((s for s in stops if text.startswith(s, at)), key=len)


def stream(chunks, stops, matcher):
    """Feed chunks as the engine does (search after each, release all but the held-back tail, flush at the
    end) -> (released pieces, stop string or None); the old algorithm when matcher is None."""
    text, released, checked, pieces = "", 0, 0, []
    hold = (matcher.hold if matcher else max(len(s) for s in stops) - 1)
    for j, chunk in enumerate(chunks):
        text += chunk
        if matcher is None:
            cut = old_find_stop(text, stops, released)
            hit = None if cut is None else (cut, old_stop_at(text, stops, cut))
        else:
            hit, checked = matcher.search(text, checked), len(text)
        if hit is not None:
            pieces.append(text[released:hit[0]])
            return pieces, hit[1]
        if j < len(chunks) - 1:                       # the last chunk is the decoder's flush: all is released
            upto = max(released, len(text) - hold)
            pieces.append(text[released:upto])
            released = upto
    pieces.append(text[released:])
    return pieces, None


def test_stop_matcher_equals_the_old_search_on_random_streams():
    rng = random.Random(0)
    found = 0
    for case in range(3000):
        alphabet = "ab" if case % 2 else "abc "
        stops = [''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 5))]
        text = ''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 12))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]   # some empty, as the decoder's
        want = stream(chunks, stops, None)
        assert stream(chunks, stops, StopMatcher(stops)) == want, (stops, chunks)
        found += want[1] is not None
    assert 1000 < found < 2900                         # both outcomes are exercised


def test_stop_matcher_prefers_the_earliest_then_the_longest():
    m = StopMatcher(["cd", "abcdef", "b", "abc", "abc"])
    assert m.hold == 5
    assert m.search("xxabcdefg", 0) == (2, "abcdef")
    assert m.search("xxab", 0) == (3, "b")
    assert m.search("xxabc", 0) == (2, "abc")                 # "abc" and "b" end here: "abc" starts first
    assert m.search("xxabcdef", 5) == (2, "abcdef")          # new text can complete a longer, earlier one
    assert m.search("xxab", 4) is None                        # only ends past `checked` are new
    with pytest.raises(ValueError):
        StopMatcher([""])


def test_stop_matcher_searches_only_new_text():
    """16 stops of 1,000 characters (the server's cap) that the text almost matches everywhere: the old
    search scanned the whole held-back window for each; the matcher looks at the new characters only
    (measured together, so that the machine's load cancels out)."""
    import time
    stops = ["a" * 500 + chr(98 + i) + "a" * 499 for i in range(16)]
    m = StopMatcher(stops)
    text = "a" * 3000
    t0 = time.perf_counter()
    for j in range(30):
        assert old_find_stop(text + "a" * j, stops, 2000) is None
    old = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j in range(30):
        assert m.search(text + "a" * (j + 4), 2999 + j) is None
    new = time.perf_counter() - t0
    assert new * 10 < old, (new, old)


# ---------------------------------------------------------------- logit_bias, stop_token_ids
@pytest.mark.parametrize("entries", [20, 400])     # a few ids (scattered add) or most of them (a dense row)
def test_logit_bias_tensors_are_made_once_and_add_as_before(entries):
    bias = {i * 7 % 500: float(i % 200 - 100) for i in range(entries)}
    bias[600] = 5.0                                   # past this vocabulary: ignored, as before
    s = Sampler(SamplingParams(temperature=0, logit_bias=bias))
    logits = torch.randn(512)
    logits[3] = float("-inf")                         # masked (a grammar): stays masked
    want = logits.clone()
    for i, v in bias.items():
        if i < 512:
            want[i] += v
    got = s.penalize(logits.clone(), [], [])
    made = s._bias
    assert torch.equal(got, want) and (made[1] is None) == (entries > 512 // 8)
    assert torch.equal(s.penalize(logits.clone(), [], [1]), want) and s._bias is made


def test_many_stop_token_ids_stop_at_the_first(llm, alone):
    stop_at = alone[0][3]
    ids = list(range(10_000, 10_255)) + [stop_at]
    engine = new_engine(llm)
    rid = engine.add_request(PROMPTS[0], greedy(LENS[0], stop_token_ids=ids))
    assert isinstance(engine.requests[rid].stop_ids, frozenset)
    toks, reasons = run(engine, [rid])
    assert toks[rid] == alone[0][:alone[0].index(stop_at)] and reasons[rid] == "stop"


def test_repetition_penalty_tracks_the_output_as_it_grows():
    """The prompt's distinct ids are gathered once; the output's are added as it grows: each step penalizes
    what the old per-token set did (every distinct id of prompt + output, once)."""
    rp = 1.7
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=rp))
    prompt, out = [3, 9, 3, 100, 7], []
    logits = torch.randn(512)
    for t in [9, 50, 50, 3, 200, 201, 50]:
        seen = torch.tensor(sorted(set(prompt) | set(out)))
        want = logits.clone()
        want[seen] = torch.where(want[seen] > 0, want[seen] / rp, want[seen] * rp)
        assert torch.equal(s.penalize(logits.clone(), prompt, out), want)
        out.append(t)
    assert s.penalize(logits.clone(), [1], [])[1] == (logits[1] / rp if logits[1] > 0 else logits[1] * rp)
