"""Each fast op against the plain reference beside it, across shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen36.ops.attention import attention, attention_reference
from qwen36.ops.conv1d import causal_conv1d, causal_conv1d_reference
from qwen36.ops.backend import ComputeConfig, resolve_backend
from qwen36.ops.linear import float_linear
from qwen36.ops.gated_delta import (gated_delta_chunked, gated_delta_recurrent, gated_delta_reference,
                                    gated_delta_steps, gated_delta_steps_reference)
from qwen36.ops.moe import moe, moe_reference

NATIVE = resolve_backend(ComputeConfig(), "cpu")                   # the native CPU kernels (where they build)
TENSOR_OPS = resolve_backend(ComputeConfig(native=False), "cpu")   # every op as tensor ops


def delta_inputs(B, H, T, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, K, generator=g), dim=-1) * K ** -0.5
    k = F.normalize(torch.randn(B, H, T, K, generator=g), dim=-1)
    v = torch.randn(B, H, T, V, generator=g)
    decay = -torch.rand(B, H, T, generator=g) * 2                             # log-decay <= 0
    beta = torch.rand(B, H, T, generator=g)
    state = torch.randn(B, H, K, V, generator=g) * 0.5
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("B,H,T,K,V,chunk", [(1, 2, 1, 8, 8, 64), (2, 3, 17, 16, 8, 4), (1, 4, 70, 8, 12, 64),
                                             (2, 1, 135, 16, 16, 64), (1, 2, 64, 8, 8, 64), (1, 2, 40, 8, 8, 7)])
def test_gated_delta_forms_agree(B, H, T, K, V, chunk):
    q, k, v, g, beta, state = delta_inputs(B, H, T, K, V, seed=T)
    o_ref, s_ref = gated_delta_reference(q, k, v, g, beta, state)
    for fn in (gated_delta_recurrent, lambda *a: gated_delta_chunked(*a, chunk=chunk)):
        o, s = fn(q, k, v, g, beta, state)
        torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


def test_gated_delta_does_not_write_inputs():
    q, k, v, g, beta, state = delta_inputs(1, 2, 9, 8, 8, seed=0)
    before = state.clone()
    gated_delta_chunked(q, k, v, g, beta, state)
    gated_delta_recurrent(q, k, v, g, beta, state)
    assert torch.equal(state, before)


@pytest.mark.parametrize("B,T,Hk,rep,K,V,slots,nkeep", [(1, 3, 2, 2, 16, 8, [1], [2]), (3, 4, 1, 4, 32, 16, [4, 0, 2], [3, 0, 1]),
                                                        (2, 1, 16, 2, 128, 128, [0, 3], [0, 0]),
                                                        (2, 3, 2, 2, 128, 128, [1, 3], [2, 1]),
                                                        (1, 1, 2, 1, 8, 8, [0], [0])])
def test_gated_delta_steps_fused_keeps_every_state(B, T, Hk, rep, K, V, slots, nkeep):
    """Several tokens per sequence in one call (speculative verification): the outputs and final states
    equal the plain recurrence, and the states after each of the first nkeep tokens are kept exactly."""
    assert NATIVE.native is not None
    H = Hk * rep
    gen = torch.Generator().manual_seed(T * K)
    q = F.normalize(torch.randn(B, T, Hk, K, generator=gen), dim=-1) * K ** -0.5
    k = F.normalize(torch.randn(B, T, Hk, K, generator=gen), dim=-1)
    v, g = torch.randn(B, T, H, V, generator=gen), -torch.rand(B, T, H, generator=gen) * 2
    beta = torch.rand(B, T, H, generator=gen)
    table = torch.randn(5, H, K, V, generator=gen) * 0.5
    start = table.clone()
    keep, want_keep = torch.full((5, 3, H, K, V), 7.0), torch.full((5, 3, H, K, V), 7.0)
    idx, nk = torch.tensor(slots), torch.tensor(nkeep)
    want_table = table.clone()
    want = gated_delta_steps_reference(want_table, idx, q, k, v, g, beta, want_keep, nk)
    got = gated_delta_steps(table, idx, q, k, v, g, beta, NATIVE, keep, nk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table, want_table, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keep, want_keep, rtol=1e-5, atol=1e-5)   # untouched rows stay 7
    for b, (slot, n) in enumerate(zip(slots, nkeep)):     # the reference itself: token-by-token recurrence
        S = start[slot:slot + 1]
        for t in range(T):
            o, S = gated_delta_recurrent(*(x[b:b + 1, t].repeat_interleave(rep, 1)[:, :, None] for x in (q, k)),
                                         v[b:b + 1, t][:, :, None], g[b:b + 1, t][:, :, None],
                                         beta[b:b + 1, t][:, :, None], S)
            torch.testing.assert_close(got[b, t], o[0, :, 0], rtol=1e-4, atol=1e-5)
            if t < n:
                torch.testing.assert_close(keep[slot, t], S[0], rtol=1e-4, atol=1e-5)


def test_gated_delta_split_sequence_equals_whole():
    """Carrying the state across calls is the same as one call (what chunked prefill and decode rely on)."""
    q, k, v, g, beta, state = delta_inputs(1, 2, 100, 8, 8, seed=1)
    o_all, s_all = gated_delta_chunked(q, k, v, g, beta, state)
    o1, s1 = gated_delta_chunked(q[:, :, :37], k[:, :, :37], v[:, :, :37], g[:, :, :37], beta[:, :, :37], state)
    o2, s2 = gated_delta_recurrent(q[:, :, 37:], k[:, :, 37:], v[:, :, 37:], g[:, :, 37:], beta[:, :, 37:], s1)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o_all, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s2, s_all, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B,T,C,W", [(1, 1, 8, 4), (2, 2, 5, 4), (1, 33, 16, 4), (3, 7, 4, 2), (1, 5, 6, 1)])
def test_causal_conv1d(B, T, C, W):
    g = torch.Generator().manual_seed(T)
    x, w, s = torch.randn(B, T, C, generator=g), torch.randn(C, W, generator=g), torch.randn(B, W - 1, C, generator=g)
    y, ns = causal_conv1d(x, w, s)
    y_ref, ns_ref = causal_conv1d_reference(x, w, s)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ns, ns_ref)
    # state = the last W-1 inputs of the concatenated stream
    torch.testing.assert_close(ns, torch.cat([s, x], 1)[:, -(W - 1):] if W > 1 else ns_ref)


@pytest.mark.parametrize("Hq,Hkv,T,S,D", [(4, 2, 1, 1, 8), (4, 2, 1, 9, 8), (8, 2, 13, 13, 16), (4, 4, 5, 12, 8),
                                          (6, 3, 70, 70, 32)])
def test_attention(Hq, Hkv, T, S, D):
    g = torch.Generator().manual_seed(S)
    q, k, v = torch.randn(Hq, T, D, generator=g), torch.randn(Hkv, S, D, generator=g), torch.randn(Hkv, S, D, generator=g)
    torch.testing.assert_close(attention(q, k, v, D ** -0.5), attention_reference(q, k, v, D ** -0.5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,E,k,H,I,wdtype", [(1, 8, 2, 16, 8, torch.float32), (13, 8, 3, 16, 12, torch.float32),
                                              (40, 16, 4, 8, 4, torch.bfloat16)])
def test_moe(N, E, k, H, I, wdtype):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    w = torch.rand(N, k, generator=g)
    gu, dn = torch.randn(E, 2 * I, H, generator=g).to(wdtype), torch.randn(E, H, I, generator=g).to(wdtype)
    linear = lambda x, w: float_linear(x, w, NATIVE)          # noqa: E731
    torch.testing.assert_close(moe(x, ids, w, gu, dn, linear), moe_reference(x, ids, w, gu, dn), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- decode glue, fused (csrc: rms_norm, ...)
def test_fused_norms_equal_their_references():
    from qwen36.layers.norm import GatedRMSNorm, RMSNorm

    assert NATIVE.native is not None
    g = torch.Generator().manual_seed(5)
    for shape in [(1, 2048), (7, 3, 40), (2, 256)]:
        norm = RMSNorm(shape[-1], 1e-6)
        norm.backend = NATIVE
        norm.weight.data = torch.randn(shape[-1], generator=g) * 0.1
        x = torch.randn(*shape, generator=g) * 3
        torch.testing.assert_close(norm(x), norm.reference(x), rtol=1e-5, atol=1e-6)
    gated = GatedRMSNorm(24, 1e-6)
    gated.backend = NATIVE
    gated.weight.data = torch.randn(24, generator=g)
    x, z = torch.randn(5, 4, 24, generator=g), torch.randn(5, 4, 24, generator=g)
    torch.testing.assert_close(gated(x, z), gated.reference(x, z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,members,keep", [(1, [0, 1, 2], [0, 0, 0]), (3, [1, 2], [2, 2, 2]), (4, [0], [3, 0, 0])])
def test_deltanet_fused_steps_equal_the_plain_path(monkeypatch, T, members, keep):
    """DeltaNet's short-step path with the native glue (delta_prep: conv, SiLU, q/k norms, gates) equals the
    tensor-op path: outputs, conv and recurrent states, and the states kept for speculation."""
    import qwen36.layers.deltanet as dn
    from qwen36.batch import ForwardBatch
    from qwen36.config import parse_text_config
    from qwen36.synth import text_config
    from tests.conftest import BASE

    cfg = parse_text_config(text_config({**BASE, "linear_num_key_heads": 2, "linear_num_value_heads": 4}))
    layer = dn.GatedDeltaNet(cfg)
    layer.backend = NATIVE
    gen = torch.Generator().manual_seed(T)
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    S, W, C = 3, cfg.linear_conv_kernel_dim, cfg.linear_conv_dim
    lens = [T if i in members else 1 for i in range(3)]
    N = sum(lens)
    m, a, b = torch.randn(N, C, generator=gen), torch.randn(N, cfg.linear_num_value_heads, generator=gen), \
        torch.randn(N, cfg.linear_num_value_heads, generator=gen)
    batch = ForwardBatch.build([2, 0, 1], [5, 5, 5], lens, [[0]] * 3, 64, keep=keep)

    def fresh():
        g2 = torch.Generator().manual_seed(99)
        return {"conv": torch.randn(S, W - 1, C, generator=g2), "state": torch.randn(S, 4, 16, 24, generator=g2) * 0.3,
                "spec_conv": torch.zeros(S, 3, W - 1, C), "spec_state": torch.zeros(S, 3, 4, 16, 24)}
    fused, plain = fresh(), fresh()
    o1, o2 = torch.zeros(N, 4, 24), torch.zeros(N, 4, 24)
    layer._steps(m, a, b, fused, batch, members, T, o1)
    layer.backend = TENSOR_OPS
    layer._steps(m, a, b, plain, batch, members, T, o2)
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fused["state"], fresh()["state"])
