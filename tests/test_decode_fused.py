"""Batch-1 decode's fused paths against the plain ones they replace, and weights in huge-page memory.

  moe_decode      the whole sparse-MoE block in one native call     vs the router + grouped experts path
  multi_linear    a layer's input projections in one native call    vs one call per projection (bit for bit)
  delta_decode    DeltaNet prep + recurrence + output norm           vs the general path (bit for bit)
  hugepages       weights copied into one huge-page arena            vs the weights as loaded (same tokens)
"""
from __future__ import annotations

import pytest
import torch

from qwen36 import LLM, SamplingParams, hugepages
from qwen36.batch import ForwardBatch
from qwen36.engine import Engine
from qwen36.ops.backend import ComputeConfig, resolve_backend
from qwen36.ops.linear import multi_linear
from qwen36.ops.moe import moe_decode

from conftest import rel_err
from test_quant import vnni_or_skip


@pytest.fixture(scope="module")
def wide(checkpoint):
    """The "wide" tiny checkpoint in int4 (every width a multiple of 128: the int8-activation kernels)."""
    vnni_or_skip()
    return LLM(checkpoint("wide"), quantization="int4", enable_prefix_caching=False)


def test_moe_block_fused_equals_the_plain_path(wide, monkeypatch):
    layer = wide.model.layers[0].mlp
    e, s = layer.experts, layer.shared_expert
    g = torch.Generator().manual_seed(3)
    for N in (1, 3, 8):
        x = torch.randn(N, wide.config.text.hidden_size, generator=g)
        fused = layer.fused(x)
        assert fused is not None
        _, ids, w = moe_decode(x, layer.gate.weight, layer.top_k, [e.gate_up_proj.tensors, e.down_proj.tensors],
                               [s.gate_proj.packed, s.up_proj.packed, s.down_proj.packed],
                               layer.shared_expert_gate.weight, layer.backend)
        want_ids, want_w = layer.route(x)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7)
        fused_backend = layer.backend
        monkeypatch.setattr(layer, "backend", resolve_backend(ComputeConfig(fused_moe=False), "cpu"))
        plain = layer(x)
        monkeypatch.setattr(layer, "backend", fused_backend)
        assert torch.equal(layer(x), fused)
        assert rel_err(fused, plain) < 1e-5
        for i in range(N):       # a row's result does not depend on the rows beside it
            assert torch.equal(layer.fused(x[i:i + 1])[0], fused[i])
    too_many = torch.randn(64 // layer.top_k + 1, wide.config.text.hidden_size, generator=g)
    assert layer.fused(too_many) is None                     # prefill-sized: the sorted grouped path
    monkeypatch.setattr(e, "on_use", lambda ids: None)       # max_ram watches expert use: not fused
    assert layer.fused(x) is None


def test_input_projections_in_one_call_equal_separate_calls(wide):
    from qwen36.layers.linear import project

    d = wide.model.layers[0].linear_attn
    mods = [d.in_proj_qkv, d.in_proj_z, d.in_proj_a, d.in_proj_b]
    weights = [m.kernel_weight for m in mods]
    backend = d.backend
    g = torch.Generator().manual_seed(4)
    for M in (1, 2, 5, 64):
        x = torch.randn(M, wide.config.text.hidden_size, generator=g)
        outs = multi_linear(x, weights, backend)
        assert outs is not None
        for got, m in zip(outs, mods):
            assert torch.equal(got, m(x))
        assert all(torch.equal(a, b) for a, b in zip(project(x, *mods), outs))
    assert multi_linear(torch.randn(65, wide.config.text.hidden_size), weights, backend) is None   # prefill
    attn = wide.model.layers[3].self_attn
    x = torch.randn(3, wide.config.text.hidden_size, generator=g)
    for got, m in zip(project(x, attn.q_proj, attn.k_proj, attn.v_proj), (attn.q_proj, attn.k_proj, attn.v_proj)):
        assert torch.equal(got, m(x))


def test_deltanet_decode_in_one_call_equals_the_general_path(wide, monkeypatch):
    """A DeltaNet decode step through delta_decode == through _steps and the norm: outputs and states."""
    import qwen36.layers.deltanet as dn

    layer = wide.model.layers[0].linear_attn
    cfg = wide.config.text
    g = torch.Generator().manual_seed(5)
    S = 3
    conv = torch.randn(S, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim, generator=g)
    state = torch.randn(S, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                        generator=g) * 0.3
    batch = ForwardBatch.build([2, 0], [7, 4], [1, 1], [[0], [1]], 64)
    x = torch.randn(2, cfg.hidden_size, generator=g)
    fused = {"conv": conv.clone(), "state": state.clone()}
    plain = {"conv": conv.clone(), "state": state.clone()}
    y1 = layer(x, batch, fused)
    monkeypatch.setattr(dn.GatedDeltaNet, "_decode", lambda *a, **k: None)
    y2 = layer(x, batch, plain)
    assert torch.equal(y1, y2)
    assert torch.equal(fused["conv"], plain["conv"]) and torch.equal(fused["state"], plain["state"])
    assert not torch.equal(fused["state"], state)


def test_hugepage_memory():
    t = hugepages.empty((3, 1000), torch.float32)
    assert t.shape == (3, 1000) and t.dtype == torch.float32 and t.data_ptr() % hugepages.HUGE == 0
    t.fill_(2.5)
    assert float(t.sum()) == 7500.0
    z = hugepages.zeros((5, 7), torch.bfloat16)
    assert z.dtype == torch.bfloat16 and not z.any()
    assert hugepages.empty((0, 4), torch.float32).numel() == 0


def test_weights_in_huge_pages_give_the_same_tokens(checkpoint):
    """LLM places its weights in a huge-page arena (with hugepages=False: where they were loaded); the tokens
    and logits are the same, and the weights are out of the checkpoint's file mappings."""
    from qwen36.checkpoint import MAPPINGS

    vnni_or_skip()
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = list(range(5, 30))
    off = LLM(checkpoint("wide"), quantization="int4", enable_prefix_caching=False,
              compute=ComputeConfig(hugepages=False))
    want, want_logits = off.generate(prompt, p), off.logits(prompt)
    on = LLM(checkpoint("wide"), quantization="int4", enable_prefix_caching=False, compute=ComputeConfig())
    got = on.generate(prompt, p)
    assert got.token_ids == want.token_ids and torch.equal(on.logits(prompt), want_logits)
    ranges = [(hugepages._address(mm), len(mm)) for mm in MAPPINGS]
    q = on.model.layers[0].linear_attn.in_proj_qkv.packed["q"]
    assert not any(a <= q.data_ptr() < a + n for a, n in ranges)
    assert q.data_ptr() % hugepages.ALIGN == 0
    arena = q.untyped_storage().data_ptr()
    assert arena % hugepages.HUGE == 0
    assert on.model.layers[0].mlp.gate.weight.untyped_storage().data_ptr() == arena
    assert on.model.embed_tokens.weight.untyped_storage().data_ptr() != arena   # one row per token: stays
    assert off.model.layers[0].mlp.gate.weight.untyped_storage().data_ptr() != \
        off.model.layers[0].linear_attn.in_proj_qkv.packed["q"].untyped_storage().data_ptr()


def test_layer_plan_equals_the_module_path(wide, monkeypatch):
    """Decode steps through the layers' native plans == through their modules: logits of every step and
    every cache tensor, bit for bit; two sequences decode in one batch."""
    from qwen36.layers import decode_plan

    layers = wide.model.layers
    assert all(decode_plan.plan_for(layer, layer.backend) is not None for layer in layers)
    prompts = [list(range(5, 40)), list(range(60, 71))]
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5)

    def run():
        engine = Engine(wide.model, None, max_num_seqs=2, max_model_len=128, enable_prefix_caching=False)
        for ids in prompts:
            engine.add_request(ids, p)
        steps = []
        while engine.has_work():
            steps.append([(o.request_id, o.token_ids, o.logprobs) for o in engine.step()])
        return steps, {i: {k: t.clone() for k, t in c.items()} for i, c in engine.cache.layers.items()}

    calls = []
    real = decode_plan.DecodePlan.__call__
    monkeypatch.setattr(decode_plan.DecodePlan, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    fused_steps, fused_cache = run()
    assert len(calls) >= 9 * len(layers)                 # every decode step of every layer
    planned = wide.model.backend
    wide.model.set_backend(resolve_backend(ComputeConfig(decode_plan=False), "cpu"))
    try:
        plain_steps, plain_cache = run()
    finally:
        wide.model.set_backend(planned)
    assert fused_steps == plain_steps
    for i in plain_cache:
        for k in plain_cache[i]:
            assert torch.equal(fused_cache[i][k], plain_cache[i][k]), (i, k)


def test_short_chunk_attention_equals_the_tensor_path(wide, monkeypatch):
    """gated_attention_short (norms, rotary, cache writes, each query alone, gate) against the tensor-op
    path of the same layer: outputs and cache rows; a decode step and a 3-token chunk in one step."""
    layer = wide.model.layers[3].self_attn
    cfg = wide.config.text
    g = torch.Generator().manual_seed(6)
    rows = 256
    kc, vc = torch.randn(rows, cfg.num_key_value_heads, cfg.head_dim, generator=g), \
        torch.randn(rows, cfg.num_key_value_heads, cfg.head_dim, generator=g)
    batch = ForwardBatch.build([0, 1], [9, 20], [1, 3], [[0], [1, 2]], 64)
    x = torch.randn(4, cfg.hidden_size, generator=g)
    rope = wide.model.rotary.cos_sin(batch.positions, torch.float32)
    fused = {"k": kc.clone(), "v": vc.clone()}
    plain = {"k": kc.clone(), "v": vc.clone()}
    y1 = layer(x, rope, batch, fused)
    # a query's result does not depend on the queries beside it
    alone = ForwardBatch.build([0], [9], [1], [[0]], 64)
    y3 = layer(x[:1], wide.model.rotary.cos_sin(alone.positions, torch.float32), alone, {"k": kc.clone(), "v": vc.clone()})
    assert torch.equal(y3[0], y1[0])
    monkeypatch.setattr(layer, "backend", resolve_backend(ComputeConfig(native=False), "cpu"))
    y2 = layer(x, rope, batch, plain)
    assert rel_err(y1, y2) < 1e-5
    torch.testing.assert_close(fused["k"], plain["k"], rtol=1e-6, atol=1e-6)
    assert torch.equal(fused["v"], plain["v"])
    written = torch.cat(batch.kv_rows)
    assert not torch.equal(fused["k"][written], kc[written])


def test_weights_stay_where_they_are_when_no_mapping_is_given(checkpoint, monkeypatch):
    """If the kernel refuses the arena's mapping, loading still works: the weights stay as loaded."""
    vnni_or_skip()

    def refuse(*a, **k):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(hugepages, "empty", refuse)
    llm = LLM(checkpoint("wide"), quantization="int4", enable_prefix_caching=False)
    q = llm.model.layers[0].linear_attn.in_proj_qkv.packed["q"]
    assert q.untyped_storage().data_ptr() != llm.model.layers[0].mlp.gate.weight.untyped_storage().data_ptr()
    out = llm.generate(list(range(5, 20)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4
