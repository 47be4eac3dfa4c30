"""The prefix cache: the policy alone (pure Python), then cache on == cache off through the engine."""
from __future__ import annotations

import pytest
import torch

from qwen36 import LLM, SamplingParams
from qwen36.engine import Engine
from qwen36.engine import output
from qwen36.engine.blocks import BlockAllocator
from qwen36.engine.prefix_cache import PrefixCache, PrefixKey, snapshot_points
from qwen36.engine.scheduler import Scheduler, SeqState

B = 4  # block size of the pure-Python tests


def cache(num_blocks=32, slots=4):
    blocks = BlockAllocator(num_blocks)
    return blocks, PrefixCache(blocks, B, slots)


def add(pc, ids, pos, seq_blocks, boundary=False):
    slot = pc.reserve_slot()
    return pc.add(slot, PrefixKey(tuple(ids)), pos, seq_blocks, boundary)


# ---------------------------------------------------------------- policy, no model
def test_lookup_takes_the_deepest_strict_prefix():
    blocks, pc = cache()
    ids = list(range(100, 114))                                  # 14 tokens: 3 full blocks + 2
    seq_blocks = blocks.allocate(4)
    add(pc, ids, 6, seq_blocks)
    add(pc, ids, 12, seq_blocks)
    add(pc, ids, 14, seq_blocks)
    assert pc.lookup(PrefixKey(tuple(ids + [1, 2]))).pos == 14
    assert pc.lookup(PrefixKey(tuple(ids))).pos == 12          # the last prompt token must still run
    assert pc.lookup(PrefixKey(tuple(ids[:7] + [0] * 8))).pos == 6       # diverges inside block 1
    assert pc.lookup(PrefixKey(tuple(ids[:5] + [0] * 8))) is None         # before the first snapshot
    hit = pc.lookup(PrefixKey(tuple(ids[:13] + [0])))
    assert hit.pos == 12 and hit.blocks == seq_blocks[:3]      # full blocks shared, no tail


def test_media_digest_is_part_of_the_key():
    blocks, pc = cache()
    ids = [5] * 12
    seq_blocks = blocks.allocate(3)
    pc.add(pc.reserve_slot(), PrefixKey(tuple(ids), ((2, 9, "imgA"),)), 11, seq_blocks)
    assert pc.lookup(PrefixKey(tuple(ids), ((2, 9, "imgA"),))).pos == 11
    assert pc.lookup(PrefixKey(tuple(ids), ((2, 9, "imgB"),))) is None   # same pads, another picture
    assert pc.lookup(PrefixKey(tuple(ids))) is None


def test_cache_salt_separates_tenants():
    """vLLM's cache_salt: the same tokens under another salt (or none) share no snapshot and no block."""
    blocks, pc = cache()
    ids = list(range(100, 111))
    pc.add(pc.reserve_slot(), PrefixKey(tuple(ids), salt="tenant-a"), 10, blocks.allocate(3))
    pc.add(pc.reserve_slot(), PrefixKey(tuple(ids), salt="tenant-a"), 3, blocks.allocate(3))   # inside block 0
    assert pc.lookup(PrefixKey(tuple(ids), salt="tenant-a")).pos == 10
    assert pc.lookup(PrefixKey(tuple(ids[:4]), salt="tenant-a")).pos == 3
    for other in ("tenant-b", ""):
        assert pc.lookup(PrefixKey(tuple(ids), salt=other)) is None
        assert pc.lookup(PrefixKey(tuple(ids[:4]), salt=other)) is None


def test_blocks_shared_by_content_and_released_on_eviction():
    blocks, pc = cache(num_blocks=8, slots=2)
    ids = list(range(12))
    a = blocks.allocate(3)
    add(pc, ids, 8, a)
    b = blocks.allocate(3)                                       # another sequence, same tokens
    add(pc, ids, 11, b)
    assert pc.groups and pc.by_hash and set(pc.cache_refs) == set(a[:2])   # b's equal blocks not duplicated
    blocks.free(a)
    blocks.free(b)                                               # both sequences finish
    assert pc.cached_only_blocks == 2 and blocks.num_free == 6
    assert pc.make_room(8) and pc.num_snapshots == 0 and blocks.num_free == 8 and not pc.by_hash


def test_lru_eviction_pins_and_boundaries():
    blocks, pc = cache(num_blocks=64, slots=3)
    ids = list(range(40))
    seq = blocks.allocate(10)
    s1 = add(pc, ids, 9, seq, boundary=True)
    s2 = add(pc, ids, 17, seq)
    s3 = add(pc, ids, 25, seq)
    pc.lookup(PrefixKey(tuple(ids[:30])))                        # uses s3; refreshes the boundary s1, not s2
    s3.pins += 1
    add(pc, ids, 33, seq)                                        # full: evicts the least recently used
    live = {s.pos for g in pc.groups.values() for s in g}
    assert live == {9, 25, 33} and pc.stats.evictions == 1
    s3.pins -= 1


def test_pinned_snapshots_are_never_evicted():
    blocks, pc = cache(num_blocks=8, slots=1)
    s = add(pc, list(range(8)), 8, blocks.allocate(2))
    s.pins = 1
    assert pc.reserve_slot() is None and not pc.make_room(8) and pc.num_snapshots == 1


def test_snapshot_points():
    ids = [1, 7, 3, 3, 7, 5, 5, 5, 5, 5]
    assert snapshot_points(ids, 0, 7, 0) == [1, 4, 10]
    assert snapshot_points(ids, 2, 7, 4) == [4, 8, 10]
    assert snapshot_points(ids, 0, None, 0, end=6) == [6]
    assert snapshot_points(ids, 0, 7, 0, min_gap=4) == [4, 10]              # 1 is too close to 4
    flood = [7] * 1000 + [5]                                                # a file quoting chat markup
    assert snapshot_points(flood, 0, 7, 0, min_gap=16, max_boundaries=3) == [967, 983, 999, 1001]


def test_boundary_flood_is_bounded_and_exact(llm):
    """Content full of the message-start token costs a bounded number of snapshots, and stays exact."""
    on, off = engine(llm, max_num_batched_tokens=512), engine(llm, on=False)
    flood = rand(20, 40) + [BOUNDARY] * 1500 + rand(20, 41)
    got = run(on, [flood], n=3)[0]
    same(got, run(off, [flood], n=3)[0])
    assert on.prefix.stats.snapshots_saved <= 33 + 1                       # boundaries + end (+ the answer's end)


def test_scheduler_admits_from_the_cache():
    s = Scheduler(max_num_seqs=2, num_blocks=16, block_size=B, max_num_batched_tokens=64, max_model_len=64, snapshot_slots=4)
    ids = tuple(range(20))
    old = s.blocks.allocate(5)
    s.prefix.add(s.prefix.reserve_slot(), PrefixKey(ids[:10]), 10, old)
    s.blocks.free(old)                                           # the cache keeps blocks 0, 1
    seq = SeqState(0, 20, 4, key=PrefixKey(ids), snap_points=(5, 10, 13, 20))
    s.add(seq)
    work, admitted = s.schedule()
    assert admitted == [seq] and seq.cached == seq.num_computed == 10 and seq.restore is not None
    assert seq.blocks[:2] == old[:2] and len(seq.blocks) == 6 and s.blocks.count[old[0]] == 2
    assert [(w.num_new, w.samples) for w in work] == [(10, True)]     # only what is not cached
    s.finish(seq)
    assert s.num_available == 16 and s.blocks.count[old[0]] == 1


def test_background_prefill_only_when_idle():
    s = Scheduler(max_num_seqs=2, num_blocks=32, block_size=B, max_num_batched_tokens=64, max_model_len=64,
                  snapshot_slots=2, background_chunk=5)
    bg = SeqState(0, 30, 0, background=True)
    fg = SeqState(1, 6, 2)
    s.add(fg)
    s.add(bg)
    _, admitted = s.schedule()
    assert admitted == [fg]                                      # background waits while fg runs
    s.finish(fg)
    work, admitted = s.schedule()
    assert admitted == [bg] and [(w.num_new, w.samples) for w in work] == [(5, False)]


def test_cache_needs_blocks_evicts_snapshots():
    s = Scheduler(max_num_seqs=2, num_blocks=6, block_size=B, max_num_batched_tokens=64, max_model_len=64, snapshot_slots=4)
    old = s.blocks.allocate(6)
    s.prefix.add(s.prefix.reserve_slot(), PrefixKey(tuple(range(24))), 24, old)
    s.blocks.free(old)
    assert s.blocks.num_free == 0 and s.num_available == 6
    seq = SeqState(0, 10, 4, key=PrefixKey(tuple(range(50, 60))))
    s.add(seq)
    _, admitted = s.schedule()
    assert admitted == [seq] and s.prefix.num_snapshots == 0 and s.prefix.stats.evictions == 1


# ---------------------------------------------------------------- through the model
@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("ratio4-irregular", seed=13), quantization=None)


BOUNDARY = 7          # stands in for <|im_start|> in these small-vocabulary prompts


def engine(llm, on=True, **kw):
    e = Engine(llm.model, None, max_num_seqs=kw.pop("max_num_seqs", 3), kv_cache_memory=kw.pop("kv", 1 << 24),
               enable_prefix_caching=on, **kw)
    e.boundary_id = BOUNDARY
    return e


def run(e, prompts, n=5):
    """Run prompts together; -> per prompt (tokens, logits of every sampled step [n, V], cached tokens)."""
    logs = {}
    orig = output.pick

    def record(r, logits, draft):
        logs.setdefault(r.request_id, []).append(logits.clone())
        return orig(r, logits, draft)
    output.pick = record                  # every position's choice goes through output.pick
    try:
        rids = [e.add_request(p, SamplingParams(temperature=0, max_tokens=n)) for p in prompts]
        toks, cached = {r: [] for r in rids}, {}
        while e.has_work():
            for o in e.step():
                toks[o.request_id] += o.token_ids
                cached[o.request_id] = o.cached_tokens
    finally:
        output.pick = orig
    return [(toks[r], torch.stack(logs[r]), cached[r]) for r in rids]


def same(a, b):
    """Identical greedy tokens, logits within 1e-4 of the largest."""
    assert a[0] == b[0]
    assert (a[1] - b[1]).abs().max() <= 1e-4 * b[1].abs().max()


def rand(n, seed):
    return torch.randint(8, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_cache_on_equals_cache_off_at_every_kind_of_boundary(llm):
    on, off = engine(llm, max_num_batched_tokens=48, snapshot_every=40), engine(llm, on=False)
    p1 = rand(150, 1)
    p1[30] = p1[97] = BOUNDARY
    (t1, *_), = run(on, [p1])
    p2 = p1 + t1 + [BOUNDARY] + rand(70, 2)                 # the next turn: prompt + answer + a new message
    p3 = p1[:97] + [BOUNDARY] + rand(20, 3)                  # a later message changed: hit at its start
    p4 = p1[:61] + rand(30, 4)                                # diverges mid-block after a periodic snapshot
    cases = [(p2, len(p1) + 4),                              # end of the answer (its last token never ran)
             (p3, 97), (p4, 40), (p2[:len(p1) + 1], len(p1)),   # end of the earlier prompt
             (p2, 200)]                                      # a repeat: the deepest snapshot before its end
    for prompt, cached in cases:
        (got,), (want,) = run(on, [prompt]), run(off, [prompt])
        same(got, want)
        assert got[2] == cached
    assert on.stats.prompt_tokens_computed < off.stats.prompt_tokens_computed / 2


def test_cache_salt_hits_only_its_own_prefixes(llm):
    """Through the engine: a repeat with the same salt hits the cache, with another salt it computes everything,
    and the tokens are the same either way."""
    e = engine(llm, max_num_batched_tokens=48, snapshot_every=40)
    prompt = rand(100, 7)

    def go(salt):
        rid = e.add_request(prompt, SamplingParams(temperature=0, max_tokens=4), cache_salt=salt)
        toks, cached = [], 0
        while e.has_work():
            for o in e.step():
                if o.request_id == rid:
                    toks += o.token_ids
                    cached = o.cached_tokens
        return toks, cached
    first, again, other, none = go("a"), go("a"), go("b"), go("")
    assert first[1] == 0 and again[1] > 0 and other[1] == 0 and none[1] == 0
    assert first[0] == again[0] == other[0] == none[0]


def test_concurrent_sharing_abort_and_batching(llm):
    on, off = engine(llm, max_num_batched_tokens=32), engine(llm, on=False)
    base = rand(120, 5)
    base[50] = BOUNDARY
    a, b, c = base + rand(9, 6), base + rand(13, 7), rand(40, 8)
    together = run(on, [a, b, c])                            # same prefix at once, with an uncached request
    for got, p in zip(together, (a, b, c)):
        same(got, run(off, [p])[0])
    # aborted mid-prefill: what it computed up to a snapshot point is kept and exact
    d = base[:50] + rand(150, 9)
    d[120] = BOUNDARY
    rid = on.add_request(d, SamplingParams(temperature=0, max_tokens=3))
    for _ in range(5):
        on.step()
    on.abort(rid)
    got = run(on, [d])[0]
    same(got, run(off, [d])[0])
    assert got[2] == 120
    assert on.scheduler.num_available == on.scheduler.num_blocks and not on.has_work()


def test_eviction_under_pressure_stays_exact(llm):
    small = engine(llm, max_num_batched_tokens=64, prefix_cache_memory=2 * llm.engine().snapshot_bytes,
                   kv=llm.engine().cache.bytes_per_block() * 3)
    off = engine(llm, on=False)
    assert small.snapshots.num_slots == 2
    held = sum(t.numel() * t.element_size() for layer in small.snapshots.layers.values() for t in layer.values())
    assert held <= 2 * llm.engine().snapshot_bytes              # the store is the whole of the bound
    prompts = [rand(90, 20 + i) for i in range(5)]
    for p in prompts + prompts[::-1]:
        same(run(small, [p + [1, 2]])[0], run(off, [p + [1, 2]])[0])
    assert small.prefix.stats.evictions > 0 and small.prefix.num_snapshots <= 2


def test_background_warm_and_preemption(llm):
    on, off = engine(llm, max_num_batched_tokens=64), engine(llm, on=False)
    hist = rand(200, 30)
    assert on.warm(hist) is not None
    on.step()                                                # one background chunk (the 64-token budget)
    nxt = hist + rand(10, 31)
    got = run(on, [nxt])[0]                                  # preempts the warm-up, keeps its progress
    assert got[2] == 64 and on.stats.background_preempted == 1
    same(got, run(off, [nxt])[0])
    on.warm(hist)
    while on.has_work():
        on.step()
    assert on.stats.background_finished == 1
    got = run(on, [nxt])[0]
    assert got[2] == len(hist)
    same(got, run(off, [nxt])[0])


def test_images_are_part_of_the_key(checkpoint):
    from PIL import Image

    llm = LLM(checkpoint("vision"), quantization=None)
    red, blue = Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))

    def chat(img):
        return [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": img},
                                             {"type": "text", "text": "What colour?"}]}]
    p = SamplingParams(temperature=0, max_tokens=3)
    first_pad = llm.encode_chat(chat(red)).ids.index(llm.config.image_token_id)
    llm.generate(llm.encode_chat(chat(red)), p)
    ref = LLM(checkpoint("vision"), enable_prefix_caching=False, quantization=None)
    for img in (blue, red):
        inputs = llm.encode_chat(chat(img))
        out = llm.engine()
        rid = out.add_request(inputs.ids, p, mm=inputs.mm)
        toks, cached = [], 0
        while out.has_work():
            for o in out.step():
                toks += o.token_ids
                cached = o.cached_tokens
        assert toks == ref.generate(ref.encode_chat(chat(img)), p).token_ids
        assert (cached <= first_pad) if img is blue else (cached > first_pad), rid
