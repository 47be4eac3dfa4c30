"""The continuous-batching engine: a batch == each request alone; stops, limits, aborts, logprobs."""
from __future__ import annotations

import pytest
import torch

from qwen36 import LLM, SamplingParams
from qwen36.engine import Engine
from qwen36.tokenizer import StreamDecoder


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("ratio4-irregular", seed=13), quantization=None)


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n)


def prompts(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


def test_sixteen_concurrent_equal_alone(llm):
    ps = prompts(16)
    lens = [3 + (i * 5) % 17 for i in range(16)]
    alone = [llm.generate(p, greedy(n)).token_ids for p, n in zip(ps, lens)]
    engine = Engine(llm.model, None, max_num_seqs=5, max_num_batched_tokens=40, kv_cache_memory=1 << 24)
    rids = [engine.add_request(p, greedy(n)) for p, n in zip(ps, lens)]
    got = {r: [] for r in rids}
    steps = 0
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
        steps += 1
    assert [got[r] for r in rids] == alone
    assert steps < sum(lens) + sum(len(p) for p in ps)        # requests really shared steps
    assert engine.scheduler.num_available == engine.scheduler.num_blocks
    assert sorted(engine.scheduler.free_slots) == list(range(5))


def test_queue_when_cache_is_short(llm):
    """A cache with room for about one request: the others wait, nothing fails, results unchanged."""
    ps = prompts(4, seed=1)
    alone = [llm.generate(p, greedy(6)).token_ids for p in ps]
    per_block = llm.engine().cache.bytes_per_block()
    blocks = -(-(max(map(len, ps)) + 6) // 64)
    engine = Engine(llm.model, None, max_num_seqs=4, kv_cache_memory=per_block * blocks)
    assert engine.scheduler.num_blocks == blocks
    rids = [engine.add_request(p, greedy(6)) for p in ps]
    got = {r: [] for r in rids}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
    assert [got[r] for r in rids] == alone


def test_preempted_requests_are_recomputed_to_the_same_output(llm):
    """KV blocks are taken as sequences grow: with room for about one whole request, three long ones
    admitted together run out, the newest is preempted and recomputed later; outputs equal each alone."""
    ps = prompts(3, seed=2)
    alone = [llm.generate(p, greedy(40)).token_ids for p in ps]
    engine = Engine(llm.model, None, max_num_seqs=3, block_size=8, kv_cache_memory=0)
    per_block = engine.cache.bytes_per_block()
    blocks = -(-(max(map(len, ps)) + 40) // 8) + 1
    engine = Engine(llm.model, None, max_num_seqs=3, block_size=8, kv_cache_memory=per_block * blocks)
    rids = [engine.add_request(p, greedy(40)) for p in ps]
    got = {r: [] for r in rids}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
    assert engine.scheduler.num_preemptions > 0
    assert [got[r] for r in rids] == alone
    assert engine.scheduler.num_available == engine.scheduler.num_blocks


def test_abort_frees_slot_and_blocks(llm):
    engine = Engine(llm.model, None, max_num_seqs=2, kv_cache_memory=1 << 24)
    a = engine.add_request(list(range(1, 50)), greedy(30))
    b = engine.add_request(list(range(2, 20)), greedy(5))
    engine.step()
    engine.abort(a)
    assert len(engine.scheduler.running) == 1
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert {o.request_id for o in outs} == {b} and outs[-1].finished
    assert engine.scheduler.num_available == engine.scheduler.num_blocks


def test_too_long_is_rejected_and_others_unaffected(llm):
    engine = Engine(llm.model, None, max_num_seqs=2, max_model_len=64, kv_cache_memory=1 << 24)
    with pytest.raises(ValueError, match="exceeds the maximum context length of 64"):
        engine.add_request(list(range(60)), greedy(10))
    rid = engine.add_request([1, 2, 3], greedy(4))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert sum(len(o.token_ids) for o in outs) == 4 and outs[-1].request_id == rid


def test_logprobs(llm):
    engine = Engine(llm.model, None, max_num_seqs=1, kv_cache_memory=1 << 24)
    engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, logprobs=3))
    outs = []
    while engine.has_work():
        outs += engine.step()
    seq = [5, 6, 7]
    for o in outs:
        lp = torch.log_softmax(llm.logits(seq)[-1], -1)
        (entry,) = o.logprobs
        assert entry["token_id"] == o.token_ids[0] and abs(entry["logprob"] - float(lp.max())) < 1e-4
        assert [i for i, _ in entry["top"]] == lp.topk(3).indices.tolist()
        seq.append(o.token_ids[0])


def test_stream_decoder_never_breaks_utf8(checkpoint):
    tok = LLM(checkpoint("demo"), quantization=None).tokenizer
    text = "naïve 👨‍👩‍👧 日本語 ∑ 🇫🇷 end"
    ids = tok.encode(text)
    bytes_per_token = [tok.decode_bytes([i]) for i in ids]
    assert any(not b.decode("utf-8", errors="ignore") for b in bytes_per_token)  # some tokens split characters
    d = StreamDecoder(tok)
    pieces = [d.feed(i) for i in ids] + [d.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_streaming_text_and_stop_strings(checkpoint):
    demo = LLM(checkpoint("demo"), quantization=None)
    full = demo.generate("Hi", greedy(12))
    stop = full.text[5:9]
    pieces = list(demo.generate_stream("Hi", SamplingParams(temperature=0, max_tokens=12, stop=[stop])))
    text = "".join(p.text for p in pieces)
    assert text == full.text[:full.text.find(stop)] and pieces[-1].finish_reason == "stop"
    assert all(stop not in p.text for p in pieces)
    # an early break aborts the request and frees its slot
    it = demo.generate_stream("Hi", greedy(12))
    next(it)
    it.close()
    assert not demo.engine().has_work() and demo.engine().scheduler.num_available == demo.engine().scheduler.num_blocks


def test_forced_tokens_after_trigger(llm):
    """tool_choice forcing: once the trigger token is sampled, the forced ids follow, then sampling resumes."""
    free = llm.generate([4, 5, 6], greedy(8)).token_ids
    trigger, forced = free[1], [11, 12, 13]
    engine = Engine(llm.model, None, max_num_seqs=1, kv_cache_memory=1 << 24)
    engine.add_request([4, 5, 6], greedy(8), force=(trigger, forced))
    got = []
    while engine.has_work():
        for o in engine.step():
            got += o.token_ids
    assert got[:5] == free[:2] + forced
    assert got[5:] == llm.generate([4, 5, 6] + got[:5], greedy(3)).token_ids
    engine.add_request([4, 5, 6], greedy(4), force=(None, forced))   # no trigger: forced first
    got = []
    while engine.has_work():
        for o in engine.step():
            got += o.token_ids
    assert got[:3] == forced


def test_requests_arriving_while_others_run(llm):
    """Requests join and leave at different steps (ids must stay distinct after others finish)."""
    ps = prompts(6, seed=3)
    lens = [2, 12, 5, 9, 3, 7]
    alone = [llm.generate(p, greedy(n)).token_ids for p, n in zip(ps, lens)]
    engine = Engine(llm.model, None, max_num_seqs=3, kv_cache_memory=1 << 24)
    got, rids, pending = {}, {}, list(range(6))
    for i in pending[:2]:
        rids[engine.add_request(ps[i], greedy(lens[i]))] = i
    pending = pending[2:]
    while engine.has_work() or pending:
        for out in engine.step():
            got.setdefault(rids[out.request_id], []).extend(out.token_ids)
            if out.finished and pending:                       # a new request arrives as one leaves
                i = pending.pop(0)
                rids[engine.add_request(ps[i], greedy(lens[i]))] = i
    assert [got[i] for i in range(6)] == alone
