"""MTP speculative decoding: the head against the math, and speculation on == off (greedy tokens, the
sampled distribution, the caches it leaves)."""
from __future__ import annotations


import pytest
import torch

from qwen36 import LLM, SamplingParams
from qwen36.engine import Engine
from qwen36.engine.config import parse_speculative_config
from qwen36.sampling import Sampler

BOUNDARY = 7          # stands in for <|im_start|> in these small-vocabulary prompts


@pytest.fixture(scope="module")
def model(checkpoint):
    from qwen36.loader import load_model
    return load_model(checkpoint("ratio2", seed=3), mtp=True)[1]


def rand(n, seed):
    return torch.randint(8, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def mtp(k, **extra):
    """speculative_config for k drafts per step from the MTP head (None: no speculation)."""
    return {"method": "mtp", "num_speculative_tokens": k, **extra} if k else None


def engine(model, k=0, draft_vocab_size=None, **kw):
    spec = mtp(k, **({"draft_vocab_size": draft_vocab_size} if draft_vocab_size else {}))
    e = Engine(model, None, max_num_seqs=kw.pop("max_num_seqs", 4), kv_cache_memory=1 << 24, speculative_config=spec,
               **kw)
    e.boundary_id = BOUNDARY
    return e


def run(e, prompts, n=12, params=None, each_step=None):
    """Run prompts together -> (tokens per prompt, cached tokens per prompt)."""
    params = params or SamplingParams(temperature=0, max_tokens=n)
    rids = [e.add_request(p, params) for p in prompts]
    toks, cached = {r: [] for r in rids}, {}
    while e.has_work():
        for o in e.step():
            toks[o.request_id] += o.token_ids
            cached[o.request_id] = o.cached_tokens
        if each_step is not None:
            each_step(e)
    return [toks[r] for r in rids], [cached[r] for r in rids]


def oracle(want: dict, right: int | None):
    """Drafts taken from a run without speculation: the first `right` of each step's drafts are the true
    next tokens, the rest wrong (None: all right)."""
    def override(r, drafts):
        true = want[tuple(r.prompt_ids)][len(r.output_ids):len(r.output_ids) + len(drafts)]
        return [t if right is None or j < right else (t + 1) % 512 for j, t in enumerate(true)]
    return override


# ---------------------------------------------------------------- configuration
def test_speculative_config_is_vllms_and_checked():
    assert parse_speculative_config(None)[0] == 0
    assert parse_speculative_config({"method": "mtp", "num_speculative_tokens": 3})[0] == 3
    assert parse_speculative_config('{"method": "mtp", "num_speculative_tokens": 2}')[0] == 2
    assert parse_speculative_config({"num_speculative_tokens": 2, "draft_vocab_size": 32768}) == (2, 32768)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        parse_speculative_config({"num_speculative_tokens": 2, "draft_vocab_size": 3})
    for bad, field in [({"method": "eagle3", "num_speculative_tokens": 2}, "method"),
                       ({"method": "mtp", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "mtp", "num_speculative_tokens": True}, "num_speculative_tokens"),
                       ({"method": "mtp", "model": "x"}, "model"), ("{nope", "JSON"), ([2], "object")]:
        with pytest.raises(ValueError, match=field):
            parse_speculative_config(bad)[0]


def test_a_checkpoint_without_mtp_weights_is_refused_by_name(checkpoint):
    with pytest.raises(Exception, match="mtp"):
        LLM(checkpoint("ratio2", seed=3, mtp=False), speculative_config={"method": "mtp", "num_speculative_tokens": 1}, quantization=None)


# ---------------------------------------------------------------- the head against the math
def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


@torch.inference_mode()
def reference_drafts(model, ids: list[int], k: int) -> list[int]:
    """The MTP head's k greedy drafts after `ids`, recomputed from scratch: the main model's normed hidden
    states of every position, then entry t = fc([norm(embed x_{t+1}), norm(h_t)]) at RoPE position t
    through the head's layer (full causal attention over all entries), g = norm(out), logits = lm_head(g);
    each further draft appends the entry (g of the last entry, the draft) and recomputes everything."""
    head = model.mtp
    n = len(ids)
    cache = model.new_cache(1, n + k)
    x = model.embed(torch.tensor(ids))
    _, h = model(x, cache.batch([0], [0], [n]), cache, hidden=True)
    emb = model.embed(torch.tensor(ids[1:]))
    hid = h[:n - 1]
    drafts = []
    for _ in range(k):
        u = head.fc(torch.cat([_rms(emb, head.pre_fc_norm_embedding.weight),
                               _rms(hid, head.pre_fc_norm_hidden.weight)], -1))
        layer_cache = model.new_cache(1, n + k)              # a fresh KV for the head's layer each time
        m = u.shape[0]
        batch = layer_cache.batch([0], [0], [m], logits="all")
        rope = model.rotary.cos_sin(batch.positions, u.dtype)
        g = _rms(head.layers[0](u, rope, batch, layer_cache[3]), head.norm.weight)   # layer 3: attention rows
        d = int(model.lm_head(g[-1:]).argmax())
        drafts.append(d)
        emb = torch.cat([emb, model.embed(torch.tensor([d]))])
        hid = torch.cat([hid, g[-1:]])
    return drafts


def test_mtp_drafts_equal_the_plain_reference(model):
    """The engine's drafts after every step (incremental head KV across prefill chunks, decode, rejected
    drafts and a prefix-cache hit) equal the head recomputed from the math over the whole sequence."""
    k = 3
    e = engine(model, k, max_num_batched_tokens=16)
    p1 = rand(40, 1)
    p1[20] = BOUNDARY
    seen = []

    def check(e):
        for r in e.requests.values():
            if r.seq.drafts:
                seen.append((r.prompt_ids + r.output_ids, list(r.seq.drafts)))
    (t1,), _ = run(e, [p1], n=8, each_step=check)
    p2 = p1 + t1 + [BOUNDARY] + rand(9, 2)                  # the next turn hits the cache
    _, (cached,) = run(e, [p2], n=7, each_step=check)
    assert cached > 0 and len(seen) >= 8
    for ids, drafts in seen:
        assert drafts == reference_drafts(model, ids, len(drafts))[:len(drafts)], len(ids)


# ---------------------------------------------------------------- on == off
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_tokens_identical_alone_and_batched(model, k):
    """Spec on == off at temperature 0: the head's own drafts (random weights: almost all rejected) and
    oracle drafts (all, or only the first, right), one request and three at once, prompts prefilled in
    chunks, outputs that run into max_tokens mid-verification."""
    prompts = [rand(37, 3), rand(5, 4), rand(70, 5)]
    want, _ = run(engine(model, max_num_batched_tokens=24), prompts, n=13)
    alone, _ = run(engine(model, k, max_num_batched_tokens=24), prompts[:1], n=13)
    assert alone == want[:1]
    by_prompt = {tuple(p): w for p, w in zip(prompts, want)}
    for right in (None, 1, 0):
        e = engine(model, k, max_num_batched_tokens=24)
        e.speculator.drafter = oracle(by_prompt, right)
        got, _ = run(e, prompts, n=13)
        assert got == want, right
        assert e.stats.draft_tokens > 0
        if right is None:
            assert e.stats.accepted_tokens == e.stats.draft_tokens       # every oracle draft accepted
        if right == 0:
            assert e.stats.accepted_tokens == 0


def test_preemption_with_speculation_keeps_the_output(model):
    """KV blocks run out mid-decode (reserved as sequences grow): the newest is preempted and recomputed;
    with accepted oracle drafts, greedy tokens still equal a run without speculation or preemption."""
    prompts = [rand(30, 6), rand(22, 7), rand(26, 8)]
    want, _ = run(engine(model, block_size=8), prompts, n=30)
    e = engine(model, 2, block_size=8)
    blocks = -(-(30 + 30 + 5) // 8) + 1
    e = Engine(model, None, max_num_seqs=3, block_size=8, speculative_config=mtp(2),
               kv_cache_memory=e.cache.bytes_per_block() * blocks)
    e.boundary_id = BOUNDARY
    e.speculator.drafter = oracle({tuple(p): w for p, w in zip(prompts, want)}, 1)
    got, _ = run(e, prompts, n=30)
    assert e.scheduler.num_preemptions > 0 and e.stats.accepted_tokens > 0
    assert got == want


def test_a_draft_vocabulary_limits_the_drafts_not_the_output(model):
    """draft_vocab_size: the head drafts among the first N ids only (the rest of the output head is not
    read), and the output is still exactly the plain run's."""
    prompts = [rand(20, 11), rand(9, 12)]
    want, _ = run(engine(model), prompts, n=10)
    e = engine(model, 2, draft_vocab_size=256)
    drafted = []

    def note(e):
        drafted.extend(d for r in e.requests.values() for d in r.seq.drafts)
    got, _ = run(e, prompts, n=10, each_step=note)
    assert got == want and drafted and max(drafted) < 256
    full = engine(model, 2)
    seen = []
    run(full, prompts, n=10, each_step=lambda e: seen.extend(d for r in e.requests.values() for d in r.seq.drafts))
    assert max(seen) >= 256                                  # the whole vocabulary drafts above it


def test_prefix_cache_hits_with_speculation_equal_cache_off(model):
    """A conversation's next turn (prompt + answer + new message) hits the snapshot a speculative run
    left; its tokens equal a run with neither cache nor speculation."""
    p1 = rand(50, 6)
    p1[25] = BOUNDARY
    want1, _ = run(engine(model, enable_prefix_caching=False), [p1])
    e = engine(model, 2)
    e.speculator.drafter = oracle({tuple(p1): want1[0]}, 1)        # half the drafts rejected
    (t1,), _ = run(e, [p1])
    assert t1 == want1[0]
    p2 = p1 + t1 + [BOUNDARY] + rand(15, 7)
    p3 = p1[:25] + [BOUNDARY] + rand(12, 8)                    # an earlier message changed
    want, _ = run(engine(model, enable_prefix_caching=False), [p2, p3])
    e.speculator.drafter = None                                    # the head's own drafts now
    got, cached = run(e, [p2, p3])
    assert got == want and cached[0] >= len(p1) and cached[1] >= 25


def test_rejected_drafts_leave_the_caches_as_if_they_never_ran(model):
    """After every step of a speculative run with rejections, the slot's DeltaNet states, its attention KV
    rows and the head's KV rows and hidden state equal those of a fresh prefill of the same tokens."""
    p = rand(30, 9)
    want, _ = run(engine(model), [p], n=10)
    e = engine(model, 3, enable_prefix_caching=False)
    e.speculator.drafter = oracle({tuple(p): want[0]}, 1)
    checked = []

    def compare(e):
        for r in e.requests.values():
            seq = r.seq
            if seq.prefilling or not r.output_ids:
                continue
            n = seq.num_computed
            ref = engine(model, 3, enable_prefix_caching=False, max_num_batched_tokens=n)   # a first chunk of n tokens
            ref.add_request((r.prompt_ids + r.output_ids)[:n + 1], SamplingParams(temperature=0, max_tokens=1))
            ref_seq = next(iter(ref.requests.values())).seq
            ref.step()
            assert ref_seq.num_computed == n
            for layer, tensors in e.cache.layers.items():
                mine, theirs = tensors, ref.cache.layers[layer]
                for name in ("conv", "state", "hidden"):
                    if name in mine:
                        torch.testing.assert_close(mine[name][seq.slot], theirs[name][ref_seq.slot], rtol=1e-4, atol=1e-5)
                if "k" in mine:
                    lo = 1 if layer == e.speculator.layer else 0            # the head's row 0 is never used
                    B = e.cache.block_size
                    pos = torch.arange(lo, n)
                    a = torch.tensor(seq.blocks)[pos // B] * B + pos % B
                    b = torch.tensor(ref_seq.blocks)[pos // B] * B + pos % B
                    for name in ("k", "v"):
                        torch.testing.assert_close(mine[name][a], theirs[name][b], rtol=1e-4, atol=1e-5)
            checked.append(n)
    got, _ = run(e, [p], n=10, each_step=compare)
    assert got == want and e.stats.accepted_tokens < e.stats.draft_tokens and len(checked) >= 3


# ---------------------------------------------------------------- sampling stays exact
def _chi2(counts, probs, n):
    return sum((c - n * q) ** 2 / (n * q) for c, q in zip(counts, probs) if q > 0)


def test_rejection_sampling_keeps_the_distribution():
    """A deterministic draft kept with probability p(draft), else p without it: the token is distributed
    as p, with filters (top-k, top-p) and without; many draws, chi-square at the 0.1% level."""
    logits = torch.tensor([2.0, 1.5, 0.3, -0.5, 1.0, -2.0])
    for params, draft in [(SamplingParams(temperature=1.0, seed=1), 0), (SamplingParams(temperature=0.7, seed=2), 3),
                          (SamplingParams(temperature=1.0, top_k=3, seed=3), 4),
                          (SamplingParams(temperature=1.0, top_k=3, seed=4), 5),       # outside the top 3
                          (SamplingParams(temperature=1.0, top_p=0.8, seed=5), 1)]:
        s = Sampler(params)
        probs = s.probs(s.penalize(logits.clone(), [], []))
        n = 20000
        counts = torch.bincount(torch.tensor([s(logits, [], [], draft=draft) for _ in range(n)]), minlength=6)
        if 0 < params.top_k:
            kept = torch.topk(logits, params.top_k).indices
            probs = torch.zeros(6).index_put_((kept,), s.probs(logits[kept] * 1.0))
        df = int((probs > 0).sum()) - 1
        critical = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[df]
        assert _chi2(counts.tolist(), probs.tolist(), n) < critical, (params, counts, probs)
        assert all(c == 0 for c, q in zip(counts.tolist(), probs.tolist()) if q == 0)


def test_sampled_outputs_keep_their_distribution_end_to_end(model):
    """Temperature 1, top-k 3, drafts = the most likely second token (accepted often): the joint frequencies
    of the first two tokens match the model's own probabilities."""
    prompt = rand(12, 10)
    e = engine(model, 1, max_num_seqs=16, enable_prefix_caching=False)
    ref = LLMLike(model)
    first = ref.filtered(prompt)
    joint, best = {}, {}
    for a, pa in first.items():
        second = ref.filtered(prompt + [a])
        best[a] = max(second, key=second.get)
        for b, pb in second.items():
            joint[(a, b)] = pa * pb
    e.speculator.drafter = lambda r, d: [best[r.output_ids[-1]]]
    n = 600
    rids = [e.add_request(prompt, SamplingParams(temperature=1.0, top_k=3, max_tokens=3, seed=s)) for s in range(n)]
    toks = {r: [] for r in rids}
    while e.has_work():
        for o in e.step():
            toks[o.request_id] += o.token_ids
    cells = list(joint)
    counts = [sum(tuple(t[:2]) == c for t in toks.values()) for c in cells]
    assert sum(counts) == n
    assert e.stats.accepted_tokens > n // 4                 # speculation did take part
    df = len(cells) - 1
    critical = {8: 26.12}[df]
    assert _chi2(counts, [joint[c] for c in cells], n) < critical, counts


class LLMLike:
    """Exact next-token probabilities (top-3, temperature 1) from full forwards, no engine."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def filtered(self, ids) -> dict[int, float]:
        cache = self.model.new_cache(1, len(ids))
        logits = self.model(self.model.embed(torch.tensor(ids)), cache.batch([0], [0], [len(ids)]), cache)[0]
        top = torch.topk(logits, 3)
        p = top.values.softmax(-1).double()
        return dict(zip(top.indices.tolist(), p.tolist()))


# ---------------------------------------------------------------- with the rest of the engine
def test_structured_output_and_images_compose_with_speculation(checkpoint):
    """Greedy answers under a JSON schema, and with an image in the prompt, are the same with and without
    speculation (drafts that break the grammar are simply rejected)."""
    import numpy as np
    from PIL import Image

    path = checkpoint("vision", seed=5)
    llm = LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 2}, quantization=None)
    plain = LLM(path, quantization=None)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    p = SamplingParams(temperature=0, max_tokens=12, json_schema=schema)
    msgs = [{"role": "user", "content": "Give n."}]
    a = llm.chat(msgs, p, enable_thinking=False)
    b = plain.chat(msgs, p, enable_thinking=False)
    assert a.content == b.content and llm.engine().stats.draft_tokens > 0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]}]
    p = SamplingParams(temperature=0, max_tokens=10)
    a, b = llm.chat(msgs, p), plain.chat(msgs, p)
    assert (a.reasoning_content, a.content) == (b.reasoning_content, b.content)


# ---------------------------------------------------------------- the server
def test_server_with_speculation_answers_as_without(checkpoint, tmp_path):
    """`serve --speculative-config` (vLLM's spelling): the official client's greedy answers, whole and
    streamed, equal the offline engine's without speculation; the spec-decode counters move; a bad config
    stops the server at start with the field named."""
    import subprocess
    import sys

    import openai

    from tests.test_server import KEY, launch, metrics, stop

    path = checkpoint("demo")
    proc, base = launch(path, tmp_path / "log", "--api-key", KEY, "--max-model-len", "256",
                        "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}')
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "Count to five."}]
        want = LLM(path, quantization=None).chat(msgs, SamplingParams(temperature=0, max_tokens=16))
        r = client.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0)
        assert r.choices[0].message.content == want.content
        assert getattr(r.choices[0].message, "reasoning_content", None) == want.reasoning_content
        chunks = client.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == (want.content or "")
        m = metrics({"base": base})
        assert m["qwen36_spec_decode_num_draft_tokens_total"] > 0
        assert m["qwen36_spec_decode_num_drafts_total"] > 0
    finally:
        stop(proc)
    bad = subprocess.run([sys.executable, "-m", "qwen36.cli", "serve", str(path), "--speculative-config",
                          '{"method": "eagle3"}'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "speculative_config.method" in bad.stderr
