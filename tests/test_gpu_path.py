"""The GPU path's device-agnostic parts, on the CPU (the CUDA runs are in test_cuda.py, skipped without a GPU).

  moe_grouped      the routed experts as two grouped GEMMs (no host read)   vs the per-token reference
  meta device      a whole prefill and decode step on the meta device: it has no data, so any read of a
                   value on the host (.item(), .tolist(), bincount's size), any CPU tensor mixed into the
                   arithmetic and any CPU-only kernel fails there; a CUDA graph could capture such a step
  decode_attention one query per sequence over padded KV tables              vs each sequence alone
  graph runner     the static-buffer decode step CUDA graphs record, without capture  vs plain decode steps
  --cpu-experts    routed experts in CPU memory as int4, the rest on the model's device (the CPU stands in
                   for the GPU)                                           vs the same int4 weights kept on the device
"""
from __future__ import annotations

import pytest
import torch

import qwen36.ops.moe as moe_ops
from qwen36 import LLM, SamplingParams
from qwen36.engine import Engine
from qwen36.layers.rotary import MRotary
from qwen36.loader import load_model
from qwen36.ops.attention import attention, decode_attention
from qwen36.ops.moe import grouped_ok, moe_grouped, moe_reference
from qwen36.layers.moe import Experts
from qwen36.layers.quant import QuantExperts, QuantLinear
from qwen36.ops.backend import ComputeConfig, resolve_backend
from qwen36.ops.qformat import dequantize

from conftest import rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_moe_equals_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    H, I = 64, 32
    for N, k, E in ((1, 2, 8), (7, 4, 16), (40, 8, 64)):   # most experts unused at N=1; several pairs each at 40
        x = torch.randn(N, H, generator=g).to(dtype)
        gate_up = (torch.randn(E, 2 * I, H, generator=g) / 8).to(dtype)
        down = (torch.randn(E, H, I, generator=g) / 8).to(dtype)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
        w = torch.rand(N, k, generator=g).softmax(-1).to(dtype)
        assert grouped_ok(x, gate_up)
        want = moe_reference(x.float(), ids, w.float(), gate_up.float(), down.float())
        got = moe_grouped(x, ids, w, gate_up, down)
        assert got.dtype == dtype and got.shape == (N, H)
        assert rel_err(got.float(), want) < (1e-6 if dtype == torch.float32 else 2e-2), (N, k, E)


def _on_meta(path):
    """The checkpoint's model in bf16 with every weight moved to the meta device (shapes, no data)."""
    cfg, model = load_model(path, torch.bfloat16, "cpu", compute_dtype=torch.bfloat16)
    model.to("meta")
    model.rotary = MRotary(cfg.text, torch.device("meta"))
    return model


def _steps(model):
    cache = model.new_cache(2, 64)
    for starts, lens in (([0, 0], [5, 3]), ([5, 3], [1, 1])):           # a prefill step, then a decode step
        batch = cache.batch([0, 1], starts, lens)
        x = model.embed(torch.zeros(sum(lens), dtype=torch.long, device="meta"))
        logits = model(x, batch, cache)
        assert logits.device.type == "meta" and logits.shape == (2, model.cfg.vocab_size)


def test_a_whole_step_runs_on_the_meta_device(checkpoint):
    _steps(_on_meta(checkpoint("ratio2")))


def test_the_meta_device_catches_a_host_read(checkpoint, monkeypatch):
    """The check above can fail: the per-expert loop (which reads the expert counts on the host) fails there."""
    monkeypatch.setattr(moe_ops, "grouped_ok", lambda x, w: False)
    with pytest.raises((RuntimeError, NotImplementedError)):
        _steps(_on_meta(checkpoint("ratio2")))


@pytest.mark.parametrize("n", ["all", 2])
def test_cpu_experts_equal_the_same_weights_on_the_device(checkpoint, n):
    path = checkpoint("wide")
    off = LLM(path, cpu_experts=n, enable_prefix_caching=False, quantization=None)
    # fp32 activations in the int4 kernels: with int8-rounded ones the values differ by that rounding
    off.model.set_backend(resolve_backend(ComputeConfig(act8=False), "cpu"))
    ref = LLM(path, enable_prefix_caching=False, quantization=None)
    L = off.config.text.num_hidden_layers
    chosen = list(range(L)) if n == "all" else list(range(L - n, L))
    for i, (a, b) in enumerate(zip(off.model.layers, ref.model.layers)):
        e = a.mlp.experts
        if i not in chosen:
            assert isinstance(e, Experts) and e.gate_up_proj.dtype == torch.float32
            continue
        assert isinstance(e, QuantExperts) and e.offloaded and e.gate_up_proj.tensors["q"].dtype == torch.uint8
        assert all(t.device.type == "cpu" for t in e.gate_up_proj.tensors.values())
        b.mlp.experts.gate_up_proj.copy_(dequantize(e.parts("gate_up_proj")))
        b.mlp.experts.down_proj.copy_(dequantize(e.parts("down_proj")))
    assert not any(isinstance(m, QuantLinear) for m in off.model.modules())          # the rest stays float
    ids = list(range(3, 40))
    assert rel_err(off.logits(ids), ref.logits(ids)) < 1e-5
    # the activations cross in fp32 and come back in the model's dtype
    bf = LLM(path, dtype="bfloat16", cpu_experts=n, enable_prefix_caching=False, quantization=None)
    assert bf.logits(ids).isfinite().all()


@pytest.mark.parametrize("bad", [-1, 5, "some", 1.5, True])
def test_cpu_experts_rejects_a_bad_value(checkpoint, bad):
    with pytest.raises(ValueError, match="cpu_experts"):
        LLM(checkpoint("ratio2"), cpu_experts=bad, quantization=None)


def test_decode_attention_equals_each_sequence_alone():
    g = torch.Generator().manual_seed(1)
    Hq, Hkv, D, rows = 4, 2, 16, 200
    kc, vc = torch.randn(rows, Hkv, D, generator=g), torch.randn(rows, Hkv, D, generator=g)
    lens = [1, 7, 40]
    seqs = [torch.randperm(rows, generator=g)[:n] for n in lens]         # scattered rows, as blocks give them
    q = torch.randn(len(lens), Hq, D, generator=g)
    table = torch.zeros(len(lens), 64, dtype=torch.long)                 # padded past the longest
    for i, r in enumerate(seqs):
        table[i, :len(r)] = r
    got = decode_attention(q, kc, vc, table, torch.tensor(lens), 0.25)
    for i, r in enumerate(seqs):
        want = attention(q[i][:, None], kc[r].transpose(0, 1), vc[r].transpose(0, 1), 0.25)[:, 0]
        assert rel_err(got[i], want) < 1e-6


@pytest.fixture
def torch_ops_only():
    """No native CPU kernels: every layer takes the tensor-op path a GPU takes (set the returned backend on
    the model)."""
    return resolve_backend(ComputeConfig(native=False), "cpu")


def _decode_all(engine, prompts, n):
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3)
    rids = [engine.add_request(ids, p) for ids in prompts]
    got = {r: [] for r in rids}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(zip(out.token_ids, out.logprobs))
    return [got[r] for r in rids]


def test_the_graph_runner_equals_plain_decode_steps(checkpoint, torch_ops_only):
    """The static-buffer decode step that CUDA graphs record (engine/cuda_graphs.py), run without capture here:
    padded to a batch size of SIZES and a KV bucket, it gives the plain steps' tokens and logprobs."""
    llm = LLM(checkpoint("ratio2"), enable_prefix_caching=False, quantization=None)
    llm.model.set_backend(torch_ops_only)
    prompts = [list(range(5, 40)), list(range(60, 71)), list(range(3, 250))]   # the last crosses 256 rows
    plain = _decode_all(Engine(llm.model, None, max_num_seqs=3, max_model_len=512, enable_prefix_caching=False),
                        prompts, 12)
    engine = Engine(llm.model, None, max_num_seqs=3, max_model_len=512, enable_prefix_caching=False, cuda_graphs=True)
    graphed = _decode_all(engine, prompts, 12)
    assert engine.graphs.replays >= 11 and not engine.graphs.capture
    assert {(4, 256), (4, 512)} <= set(engine.graphs.graphs)            # 3 padded to 4; both KV buckets
    for a, b in zip(plain, graphed):
        assert [t for t, _ in a] == [t for t, _ in b]
        for (_, la), (_, lb) in zip(a, b):
            assert abs(la["logprob"] - lb["logprob"]) < 1e-4
            assert [i for i, _ in la["top"]] == [i for i, _ in lb["top"]]
            assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(la["top"], lb["top"]))
    # the scheduler never handed out the scratch slot and block the padding rows use
    assert engine.cache.num_slots == 4 and engine.graphs.scratch_slot == 3


def test_cuda_graphs_need_a_cuda_device(checkpoint):
    with pytest.raises(ValueError, match="cuda_graphs"):
        LLM(checkpoint("ratio2"), cuda_graphs=True, quantization=None)

