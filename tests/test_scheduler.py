"""The scheduler alone (pure Python, no model)."""
from __future__ import annotations

import pytest

from qwen36.engine.blocks import BlockAllocator
from qwen36.engine.scheduler import Scheduler, SeqState


def seq(i, prompt, max_tokens):
    return SeqState(seq_id=i, prompt_len=prompt, max_tokens=max_tokens)


def test_block_allocator():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert sorted(x) == [0, 1, 2] and a.num_free == 1
    assert a.allocate(2) is None and a.num_free == 1
    a.free(x)
    assert a.num_free == 4


def test_prefill_chunks_within_budget_then_decode():
    s = Scheduler(max_num_seqs=2, num_blocks=16, block_size=4, max_num_batched_tokens=10, max_model_len=64)
    a = seq(0, 23, 5)
    s.add(a)
    work, admitted = s.schedule()
    assert admitted == [a] and [(w.num_new, w.samples) for w in work] == [(10, False)]
    a.num_computed += 10
    work, _ = s.schedule()
    assert [(w.num_new, w.samples) for w in work] == [(10, False)]
    a.num_computed += 10
    work, _ = s.schedule()
    assert [(w.num_new, w.samples) for w in work] == [(3, True)]
    a.num_computed += 3
    a.num_tokens += 1                                  # the sampled token
    work, _ = s.schedule()
    assert [(w.num_new, w.samples) for w in work] == [(1, True)]


def test_short_prompt_is_not_held_behind_a_long_prompts_chunks():
    """A long prompt arrives first; a short one arriving during its prefill takes its whole chunk at the next
    step (fewest tokens left first), and the long one keeps the rest of the budget."""
    s = Scheduler(max_num_seqs=2, num_blocks=64, block_size=4, max_num_batched_tokens=10, max_model_len=128)
    long, short = seq(0, 100, 2), seq(1, 4, 2)
    s.add(long)
    (w,), _ = s.schedule()
    assert w.seq is long and w.num_new == 10
    long.num_computed += 10
    s.add(short)
    work, _ = s.schedule()
    assert [(w.seq, w.num_new, w.samples) for w in work] == [(short, 4, True), (long, 6, False)]


def test_prompt_chunks_shrink_while_others_decode():
    """While a sequence decodes (someone waits for each step), a prompt gets a quarter of the budget per step,
    so that step stays short; alone it gets the whole budget."""
    s = Scheduler(max_num_seqs=2, num_blocks=64, block_size=4, max_num_batched_tokens=64, max_model_len=256)
    a, b = seq(0, 4, 8), seq(1, 200, 2)
    s.add(a)
    s.schedule()
    a.num_computed, a.num_tokens = 4, 5                  # a's prompt is done and its first token sampled
    s.add(b)
    work, _ = s.schedule()
    assert [(w.seq, w.num_new) for w in work] == [(a, 1), (b, 16)]
    s.finish(a)
    b.num_computed += 16
    (w,), _ = s.schedule()
    assert (w.seq, w.num_new) == (b, 64)


def test_decodes_first_and_share_budget():
    s = Scheduler(max_num_seqs=3, num_blocks=64, block_size=4, max_num_batched_tokens=8, max_model_len=64)
    a, b = seq(0, 2, 4), seq(1, 30, 4)
    s.add(a)
    s.add(b)
    work, admitted = s.schedule()
    assert admitted == [a, b]
    assert [(w.seq.seq_id, w.num_new) for w in work] == [(0, 2), (1, 6)]
    a.num_computed, a.num_tokens, b.num_computed = 2, 3, 6
    work, _ = s.schedule()
    assert [(w.seq.seq_id, w.num_new, w.samples) for w in work] == [(0, 1, True), (1, 7, False)]


def run(work):
    """What the engine does with a step's work: the tokens run are computed, a sampling step adds a token."""
    for w in work:
        w.seq.num_computed += w.num_new
        w.seq.num_tokens += w.samples


def test_admission_waits_for_blocks_and_slots_in_order():
    s = Scheduler(max_num_seqs=2, num_blocks=6, block_size=4, max_num_batched_tokens=64, max_model_len=64)
    a, b, c = seq(0, 10, 6), seq(1, 4, 4), seq(2, 1, 1)      # a holds 3 blocks (11 rows), b 2 (5 rows), c 1
    for x in (a, b, c):
        s.add(x)
    _, admitted = s.schedule()
    assert admitted == [a, b]                                  # slots full: c waits
    assert [len(a.blocks), len(b.blocks)] == [3, 2] and s.blocks.num_free == 1
    s.finish(b)
    assert s.blocks.num_free == 3 and b.slot == -1
    _, admitted = s.schedule()
    assert admitted == [c]


def test_no_overtaking_when_head_does_not_fit():
    s = Scheduler(max_num_seqs=4, num_blocks=4, block_size=4, max_num_batched_tokens=64, max_model_len=64)
    big, small1, small2 = seq(0, 8, 8), seq(1, 12, 4), seq(2, 1, 1)
    s.add(big)
    s.add(small1)
    s.add(small2)
    _, admitted = s.schedule()
    assert admitted == [big]                                   # small1 needs 4 blocks, 1 left: small2 waits too
    s.finish(big)
    _, admitted = s.schedule()
    assert admitted == [small1]


def test_blocks_are_reserved_as_the_sequence_grows():
    s = Scheduler(max_num_seqs=1, num_blocks=8, block_size=4, max_num_batched_tokens=64, max_model_len=32)
    a = seq(0, 4, 10)
    s.add(a)
    held = []
    for _ in range(12):
        work, _ = s.schedule()
        held.append(len(a.blocks))
        assert len(a.blocks) * 4 >= a.num_computed + sum(w.num_new for w in work)   # the step's rows fit
        run(work)
        if a.num_tokens == a.prompt_len + a.max_tokens:
            break
    assert held == [2, 2, 2, 2, 3, 3, 3, 3, 4, 4] and s.blocks.num_free == 4   # never past 14 tokens' blocks


def test_long_request_without_max_tokens_does_not_hold_short_ones():
    """A request that may run to the end of the context holds only what it has written: a short request
    arriving after it is admitted at once, not after the long one finishes."""
    s = Scheduler(max_num_seqs=4, num_blocks=8, block_size=4, max_num_batched_tokens=64, max_model_len=32)
    long, short = seq(0, 4, 28), seq(1, 4, 4)
    s.add(long)
    run(s.schedule()[0])
    s.add(short)
    _, admitted = s.schedule()
    assert admitted == [short] and long in s.running


def test_preemption_recomputes_the_newest():
    s = Scheduler(max_num_seqs=2, num_blocks=4, block_size=4, max_num_batched_tokens=64, max_model_len=16)
    a, b = seq(0, 4, 12), seq(1, 3, 9)
    s.add(a)
    s.add(b)
    _, admitted = s.schedule()
    assert admitted == [a, b]
    while not s.waiting:                                       # both decode until a needs b's blocks
        run(s.schedule()[0])
    assert s.num_preemptions == 1 and b.preemptions == 1 and s.waiting[0] is b and b.slot == -1
    generated = b.num_tokens - 3
    assert generated > 0 and (b.prompt_len, b.max_tokens) == (3 + generated, 9 - generated)  # same total
    assert b.num_computed == 0 and b.prefilling
    while a.num_tokens < 16:
        run(s.schedule()[0])
    s.finish(a)
    work, admitted = s.schedule()
    assert admitted == [b] and [(w.num_new, w.samples) for w in work] == [(3 + generated, True)]


def test_requests_that_can_never_fit_are_rejected():
    s = Scheduler(max_num_seqs=2, num_blocks=4, block_size=4, max_num_batched_tokens=64, max_model_len=20)
    with pytest.raises(ValueError, match=r"prompt \(18 tokens\) \+ max_tokens \(3\) = 21 exceeds .* 20 tokens"):
        s.add(seq(0, 18, 3))
    s2 = Scheduler(max_num_seqs=2, num_blocks=4, block_size=4, max_num_batched_tokens=64, max_model_len=100)
    with pytest.raises(ValueError, match="more KV cache"):
        s2.add(seq(0, 15, 2))


def test_abort_waiting():
    s = Scheduler(max_num_seqs=1, num_blocks=8, block_size=4, max_num_batched_tokens=64, max_model_len=64)
    a, b = seq(0, 4, 4), seq(1, 4, 4)
    s.add(a)
    s.add(b)
    s.schedule()
    s.finish(b)                                                # still waiting: just dropped
    assert not s.waiting and s.running == [a]
