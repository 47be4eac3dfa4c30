"""Attention at depth: the native short/decode kernel (key blocks merged in a fixed order; fp32, bf16, int8 KV)
against the tensor reference, its results independent of the tokens beside a query and of the thread count;
the tiled prefill (key blocks merged by log-sum-exp) against the untiled reference, alone and in the model."""
from __future__ import annotations

import pytest
import torch

from qwen36.ops import attention as A
from qwen36.ops.attention import attention_reference, kv_read, kv_write, prefill_attention, quantize_kv

KV = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
KEY_BLOCK = 512                     # the native kernel's key block (csrc/qkernels.cpp kKeyBlock)


def native():
    from qwen36.ops.native import load
    ext = load()
    if ext is None:
        pytest.skip("no native kernels on this machine")
    return ext


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def make_cache(R, Hkv, D, kv: str, g):
    """R rows of random K/V in storage `kv` (written through kv_write, as the layers write them)."""
    cache = {"k": torch.zeros(R, Hkv, D, dtype=KV[kv]), "v": torch.zeros(R, Hkv, D, dtype=KV[kv])}
    if kv == "int8":
        cache |= {"k_scale": torch.zeros(R, Hkv), "v_scale": torch.zeros(R, Hkv)}
    kv_write(cache, torch.arange(R), torch.randn(R, Hkv, D, generator=g), torch.randn(R, Hkv, D, generator=g) * 2)
    return cache


def clone(cache):
    return {k: t.clone() for k, t in cache.items()}


def norm_rope(x, w, eps, cos, sin):
    """The kernel's q/k transform in tensor ops: (1 + w) RMS norm, NeoX rotation of the first rd dims."""
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)
    rd = cos.shape[-1]
    h = rd // 2
    rot = n[..., :rd]
    rotated = torch.cat([-rot[..., h:], rot[..., :h]], -1)
    return torch.cat([rot * cos[:, None] + rotated * sin[:, None], n[..., rd:]], -1)


def short_case(Hq, Hkv, D, depths, lens, kv, seed=0):
    """A step of sequences with `lens` new tokens at `depths` cached rows, over a shuffled block table."""
    g = torch.Generator().manual_seed(seed)
    total = sum(depths) + sum(lens)
    R = total + 17
    cache = make_cache(R, Hkv, D, kv, g)
    perm = torch.randperm(R, generator=g)
    rows, at = [], 0
    for d, n in zip(depths, lens):
        rows.append(perm[at:at + d + n])
        at += d + n
    n = sum(lens)
    rd = D // 4
    ang = torch.rand(n, rd // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    return dict(q=torch.randn(n, Hq, 2 * D, generator=g), k=torch.randn(n, Hkv, D, generator=g),
                v=torch.randn(n, Hkv, D, generator=g), qw=torch.randn(D, generator=g) * 0.1,
                kw=torch.randn(D, generator=g) * 0.1, cos=cos, sin=sin, cache=cache, rows=rows, lens=lens)


def run_native(c, cache):
    ext = native()
    rows = torch.cat(c["rows"])
    rcu = torch.tensor([0] + [len(r) for r in c["rows"]]).cumsum(0)
    tcu = torch.tensor([0] + list(c["lens"])).cumsum(0)
    D = c["k"].shape[2]
    return ext.gated_attention_short(c["q"], c["k"], c["v"], c["qw"], c["kw"], 1e-6, c["cos"], c["sin"],
                                     cache["k"], cache["v"], *A.kv_scales(cache), rows, rcu, tcu, D ** -0.5)


def run_reference(c, cache):
    """Tensor ops: the new rows written (kv_write), each query alone against its prefix (attention_reference
    over the dequantized rows), the gate."""
    D = c["k"].shape[2]
    q, gate = c["q"].chunk(2, -1)
    qn = norm_rope(q, c["qw"], 1e-6, c["cos"], c["sin"])
    kn = norm_rope(c["k"], c["kw"], 1e-6, c["cos"], c["sin"])
    out, at = [], 0
    for rows, T in zip(c["rows"], c["lens"]):
        kv_write(cache, rows[-T:], kn[at:at + T], c["v"][at:at + T])
        S = len(rows) - T
        for j in range(T):
            K, V = kv_read(cache, rows[:S + j + 1], torch.float32)
            o = attention_reference(qn[at + j][:, None], K.transpose(0, 1), V.transpose(0, 1), D ** -0.5)[:, 0]
            out.append((o * torch.sigmoid(gate[at + j])).reshape(-1))
        at += T
    return torch.stack(out)


@pytest.mark.parametrize("kv", list(KV))
@pytest.mark.parametrize("Hq,Hkv", [(16, 2), (6, 2), (12, 1)])      # GQA 8:1 (the model's), 3:1, 12:1 (> 8)
def test_native_kernel_equals_the_tensor_reference_at_depth(kv, Hq, Hkv):
    """Decode at depths inside one key block, at its edge and over several blocks, and a 3-token verification
    chunk, in one call: outputs against the reference reading the same stored rows; the rows the kernel
    wrote equal the tensor path's writes (int8: codes within one step, scales to rounding)."""
    D = 64
    c = short_case(Hq, Hkv, D, depths=[0, 40, KEY_BLOCK - 1, 2 * KEY_BLOCK + 300], lens=[1, 1, 1, 3], kv=kv)
    got_cache, ref_cache = clone(c["cache"]), clone(c["cache"])
    got = run_native(c, got_cache)
    want = run_reference(c, clone(got_cache))            # the reference reads the rows the kernel stored
    assert rel(got, want) < 2e-5
    run_reference(c, ref_cache)                          # ... and writes its own
    new = torch.cat([r[-T:] for r, T in zip(c["rows"], c["lens"])])
    if kv == "int8":
        assert (got_cache["k"][new].int() - ref_cache["k"][new].int()).abs().max() <= 1
        assert torch.equal(got_cache["v"][new], ref_cache["v"][new])
        torch.testing.assert_close(got_cache["k_scale"][new], ref_cache["k_scale"][new], rtol=1e-5, atol=0)
        assert torch.equal(got_cache["v_scale"][new], ref_cache["v_scale"][new])
    else:
        torch.testing.assert_close(got_cache["k"][new].float(), ref_cache["k"][new].float(), rtol=1e-2 if kv ==
                                   "bfloat16" else 1e-5, atol=1e-5)
        assert torch.equal(got_cache["v"][new], ref_cache["v"][new])
    untouched = torch.ones(len(got_cache["k"]), dtype=torch.bool)
    untouched[new] = False
    assert torch.equal(got_cache["k"][untouched], c["cache"]["k"][untouched])


@pytest.mark.parametrize("kv", list(KV))
def test_a_query_gives_the_same_result_alone_with_drafts_and_on_any_thread_count(kv):
    """The key blocks are fixed by position, not by the call: a decode at depth (3 blocks) equals the same
    query verified with 3 drafts behind it, bit for bit, and on 1 or 2 threads."""
    c = short_case(16, 2, 64, depths=[2 * KEY_BLOCK + 100], lens=[4], kv=kv, seed=1)
    batch = run_native(c, clone(c["cache"]))
    alone = dict(c, q=c["q"][:1], k=c["k"][:1], v=c["v"][:1], cos=c["cos"][:1], sin=c["sin"][:1], lens=[1],
                 rows=[c["rows"][0][:-3]])
    assert torch.equal(run_native(alone, clone(c["cache"]))[0], batch[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_native(c, clone(c["cache"]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, batch)


@pytest.mark.parametrize("kv", list(KV))
@pytest.mark.parametrize("prefix", [0, 230])
def test_tiled_prefill_equals_the_reference(kv, prefix, monkeypatch):
    """prefill_attention over key blocks of 64 rows (S = 300 or 530: several blocks, the causal mask inside
    the last ones, GQA 4:1) against attention_reference over all rows at once; each read stays within a block."""
    g = torch.Generator().manual_seed(2)
    Hq, Hkv, D, T, block = 8, 2, 32, 300, 64
    S = prefix + T
    cache = make_cache(S + 50, Hkv, D, kv, g)
    rows = torch.randperm(S + 50, generator=g)[:S]
    q = torch.randn(Hq, T, D, generator=g)
    reads = []
    read = A.kv_read
    monkeypatch.setattr(A, "kv_read", lambda c, index, dtype: reads.append(len(index)) or read(c, index, dtype))
    got = prefill_attention(q, cache, rows, D ** -0.5, block=block)
    assert max(reads) <= block and sum(reads) == S
    K, V = read(cache, rows, torch.float32)
    want = attention_reference(q, K.transpose(0, 1), V.transpose(0, 1), D ** -0.5)
    assert rel(got, want) < 1e-5
    # bf16 activations: the same tiles in bf16, within bf16's rounding
    got16 = prefill_attention(q.bfloat16(), cache, rows, D ** -0.5, block=block)
    assert got16.dtype == torch.bfloat16 and rel(got16.float(), want) < 2e-2


def test_the_model_prefills_the_same_with_small_key_blocks(checkpoint, monkeypatch):
    """A 200-token prompt in chunks of 70 (each against its cached prefix) with key blocks of 48 rows equals
    the untiled prefill (one block), logits within 1e-5 of their largest."""
    from qwen36.loader import load_model
    model = load_model(checkpoint("ratio2", seed=5))[1]
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(3))

    def prefill():
        cache = model.new_cache(1, 256)
        out = []
        for s in range(0, 200, 70):
            n = min(70, 200 - s)
            batch = cache.batch([0], [s], [n], logits="all")
            out.append(model(model.embed(ids[s:s + n]), batch, cache))
        return torch.cat(out)

    want = prefill()
    monkeypatch.setattr(A, "PREFILL_BLOCK", 48)
    got = prefill()
    assert rel(got, want) < 1e-5


def test_quantize_kv_round_trip_bound():
    """int8 rows: |x - code * scale| <= scale / 2 elementwise (round to nearest), scale = absmax / 127;
    a zero row stays zero."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 2, 256, generator=g) * torch.logspace(-3, 3, 64)[:, None, None]
    x[0, 0] = 0
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.shape == (64, 2)
    err = (codes.float() * scale[..., None] - x).abs()
    assert torch.all(err <= scale[..., None] * 0.5 * (1 + 1e-5))
    assert torch.equal(scale, x.abs().amax(-1) / 127)
    assert not codes[0, 0].any() and scale[0, 0] == 0
