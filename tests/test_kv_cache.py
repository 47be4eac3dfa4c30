"""The KV cache's storage dtype (EngineConfig.kv_cache_dtype): the layout and its bytes, an engine's logits
against fp32 KV, and the optimisations (speculation, prefix-cache restore) unchanged by int8 KV."""
from __future__ import annotations

import pytest
import torch

from qwen36.cache import HybridCache, kv_storage
from qwen36.engine import Engine

from test_prefix_cache import run as run_logged

BOUNDARY = 7          # stands in for <|im_start|> in these small-vocabulary prompts
# logits of bf16 / int8 KV against fp32 KV, relative to the largest logit: bf16 rounds each stored K/V
# element to 2^-9 relative, int8 to absmax/254 of its row; through 2 attention layers of a random model
# that is ~1e-3 of the logits. The bounds leave 10x room; a wrong scale or a stale row is O(1).
BOUND = {"bfloat16": 1e-2, "int8": 2e-2}


@pytest.fixture(scope="module")
def model(checkpoint):
    from qwen36.loader import load_model
    return load_model(checkpoint("ratio2", seed=3), mtp=True)[1]


def rand(n, seed):
    return torch.randint(8, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(e, prompts, n=8):
    """test_prefix_cache's run (tokens, logits of every sampled step, cached tokens per prompt), n tokens each."""
    return run_logged(e, prompts, n)


def engine(model, kv="auto", k=0, **kw):
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    e = Engine(model, None, max_num_seqs=kw.pop("max_num_seqs", 3), kv_cache_memory=1 << 24, kv_cache_dtype=kv,
               speculative_config=spec, **kw)
    e.boundary_id = BOUNDARY
    return e


@pytest.mark.parametrize("kv", ["float32", "bfloat16", "int8"])
def test_the_layout_stores_kv_in_its_dtype_and_counts_its_bytes(model, kv):
    cfg = model.cfg
    layout = model.cache_layout(mtp=True, kv_dtype=kv)
    per_block = HybridCache(layout, 1, 1, 64, model.compute_dtype, "meta").bytes_per_block()
    attn = sum(layer.full_attention for layer in model.layers) + 1                        # + the MTP layer
    elem = {"float32": 4, "bfloat16": 2, "int8": 1}[kv]
    scales = 2 * cfg.num_key_value_heads * 4 if kv == "int8" else 0
    assert per_block == attn * 64 * (2 * cfg.num_key_value_heads * cfg.head_dim * elem + scales)
    e = engine(model, kv, enable_prefix_caching=True)
    for i, tensors in e.runner.cache.layers.items():
        if "k" in tensors:
            assert tensors["k"].dtype == tensors["v"].dtype == kv_storage(kv, model.compute_dtype)
            assert ("k_scale" in tensors) == (kv == "int8")
    # the snapshot store keeps the scales of the KV tail rows
    assert all(("k_scale" in t) == (kv == "int8") for i, t in e.runner.snapshots.layers.items()
               if "k" in t)
    assert kv_storage("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError):
        kv_storage("fp8", torch.float32)


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_engine_logits_with_low_precision_kv_stay_close_to_fp32_kv(model, kv):
    """Two prompts together (chunked prefill against a cached prefix, then decode steps through the native
    kernel): every sampled position's logits within BOUND of the fp32-KV run while the tokens agree."""
    prompts = [rand(150, 1), rand(70, 2)]
    want = run(engine(model, "float32", max_num_batched_tokens=64), prompts)
    got = run(engine(model, kv, max_num_batched_tokens=64), prompts)
    worst = 0.0
    for (gt, gl, _), (wt, wl, _) in zip(got, want):
        same = next((i for i, (a, b) in enumerate(zip(gt, wt)) if a != b), len(wt)) + 1   # positions compared
        err = (gl[:same] - wl[:same]).abs().max() / wl[:same].abs().max()
        worst = max(worst, float(err))
    assert 0 < worst < BOUND[kv], worst


def test_speculation_with_int8_kv_equals_int8_without(model):
    """Verification reads the int8 rows as decode does (same kernel, same key blocks): speculative greedy tokens
    equal the plain int8 run's, the MTP layer's int8 KV included."""
    prompts = [rand(40, 3), rand(90, 4)]
    want = [t for t, _, _ in run(engine(model, "int8"), prompts, n=12)]
    got = [t for t, _, _ in run(engine(model, "int8", k=2), prompts, n=12)]
    assert got == want


def test_prefix_cache_restore_with_int8_kv_equals_cache_off(model):
    """A next turn restores the snapshot (the KV tail's codes and scales, in another slot and block) and
    prefills only the rest: its tokens and logits equal an int8 run without the prefix cache."""
    p1 = rand(100, 5)
    p1[30] = BOUNDARY
    on, off = engine(model, "int8", enable_prefix_caching=True), engine(model, "int8", enable_prefix_caching=False)
    (t1, _, _), = run(on, [p1])
    run(on, [rand(200, 9)])              # another sequence writes over the freed blocks (p1's tail block included)
    p2 = p1 + t1 + [BOUNDARY] + rand(25, 6)
    (got,), (want,) = run(on, [p2]), run(off, [p2])
    assert got[2] >= len(p1)                          # the snapshot was used
    assert got[0] == want[0]
    assert (got[1] - want[1]).abs().max() <= 1e-4 * want[1].abs().max()


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_the_tensor_paths_read_low_precision_kv_as_the_native_kernel(model, kv):
    """Without the native kernels (the GPU's paths, run on the CPU): short chunks one query at a time, decode
    steps over padded tables through the CUDA-graph runner's static buffers (uncaptured). Same tokens as the
    native kernel's run with the same KV dtype, logits within 1e-3 of their largest: the two paths' keys agree
    to fp32 rounding, which can still land a stored element on the neighbouring bf16 value or int8 code
    (measured: 1.5e-4 bf16, 1.5e-6 int8)."""
    from qwen36.ops.backend import ComputeConfig, resolve_backend
    prompts = [rand(60, 11), rand(30, 12), rand(5, 13)]
    want = run(engine(model, kv), prompts)
    saved = model.backend
    model.set_backend(resolve_backend(ComputeConfig(native=False), "cpu"))
    try:
        e = engine(model, kv, cuda_graphs=True, enable_prefix_caching=False)
        got = run(e, prompts)
    finally:
        model.set_backend(saved)
    assert e.runner.graphs.replays > 0
    for g, w in zip(got, want):
        assert g[0] == w[0]
        assert (g[1] - w[1]).abs().max() <= 1e-3 * w[1].abs().max()
