"""Weight-only quantization: formats, kernels against the dequantized reference, load-time quantization,
stored quantized checkpoints, quality."""
from __future__ import annotations

import json

import pytest
import torch

from qwen36 import LLM, SamplingParams
from qwen36.export import quantize_checkpoint
from qwen36.layers.quant import QuantLinear
from qwen36.ops.backend import PREFILL_ROWS, ComputeConfig, resolve_backend
from qwen36.ops.linear import qlinear, qlinear_act8_reference, qlinear_reference
from qwen36.ops.moe import qlinear_experts, qlinear_experts_sorted, sorted_experts_ok
from qwen36.ops.qformat import DEFAULT_GROUP, QuantConfig, dequantize, group_for, quantize_int4, quantize_int8

NATIVE = resolve_backend(ComputeConfig(), "cpu")                       # every native route this CPU has
FP32_ACTIVATIONS = resolve_backend(ComputeConfig(act8=False), "cpu")   # int4 weights keep fp32 activations

from conftest import rel_err


def test_int8_roundtrip_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    t = quantize_int8(w)
    assert t["q"].dtype == torch.int8 and t["scale"].shape == (64,)
    assert float((dequantize(t) - w).norm() / w.norm()) < 0.01
    assert float((dequantize(t) - w).abs().max()) <= float(t["scale"].max()) / 2 + 1e-6   # half a step


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_roundtrip_error(group):
    w = torch.randn(3, 32, 256, generator=torch.Generator().manual_seed(group))   # leading expert axis
    t = quantize_int4(w, group)
    assert t["q"].shape == (3, 32, 128) and t["scale"].shape == (3, 32, 256 // group)
    d = dequantize(t)
    step = t["scale"].repeat_interleave(group, -1)
    assert bool(((d - w).abs() <= step / 2 + 1e-6).all())                           # within half a step
    assert float((d - w).norm() / w.norm()) < 0.11


def test_group_for_small_widths():
    assert group_for(2048, 64) == 64 and group_for(96, 64) == 32 and group_for(48, 64) == 48
    with pytest.raises(ValueError):
        group_for(7, 64)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("M", [1, 3, 64])
def test_kernel_matches_dequantized_reference(method, M):
    g = torch.Generator().manual_seed(M)
    w, x = torch.randn(96, 256, generator=g), torch.randn(M, 256, generator=g)
    t = quantize_int8(w) if method == "int8" else quantize_int4(w, 64)
    want = x @ dequantize(t).t()
    got = qlinear(x, t, NATIVE)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    module = QuantLinear(256, 96, QuantConfig(method, 64))
    module.load(t)
    roundtrip = module.parts()
    assert all(torch.equal(roundtrip[k], t[k]) for k in t)


@pytest.mark.parametrize("method,max_kl", [("int8", 0.05), ("int4", 1.0)])
def test_quantized_model_close_to_float(checkpoint, method, max_kl):
    path = checkpoint("ratio2", seed=3)
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = LLM(path, quantization=None).logits(ids).log_softmax(-1)
    q = LLM(path, quantization=method)
    got = q.logits(ids).log_softmax(-1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert 0 < kl < max_kl
    # the quantized model is self-consistent: decode with the cache == full forward
    out = q.generate(ids, SamplingParams(temperature=0, max_tokens=6)).token_ids
    seq = list(ids)
    for tok in out:
        assert tok == int(q.logits(seq)[-1].argmax())
        seq.append(tok)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_stored_quantized_checkpoint_loads_identically(checkpoint, tmp_path, method):
    src = checkpoint("ratio4-irregular", seed=2)
    out = quantize_checkpoint(src, tmp_path / "q", method, DEFAULT_GROUP)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == (8 if method == "int8" else 4)
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    ids = list(range(5, 60))
    a = LLM(src, quantization=method).logits(ids)
    b = LLM(out, quantization=None).logits(ids)
    assert rel_err(b, a) == 0
    size_q = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    size_src = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert size_q < size_src
    with pytest.raises(ValueError, match="stored quantized"):
        LLM(out, quantization="int8" if method == "int4" else "int4")


def test_quant_config_json():
    c = QuantConfig("int4", 128)
    assert QuantConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError):
        QuantConfig.from_json({"quant_method": "gptq", "bits": 4})


def test_native_kernels_are_built_and_used():
    """On this machine kind (x86 with AVX2, gcc) the fast kernels must build; otherwise the reference path
    would silently carry every quantized model."""
    assert NATIVE.native is not None


@pytest.mark.parametrize("M", [1, 5, 100])
def test_native_int4_layout_and_paths(M):
    """The kernel reads the stored nibble order: compare with the dequantized reference at real widths,
    for GEMV, small-M tiles and the dequantize-then-GEMM path (int8 activations turned off)."""
    g = torch.Generator().manual_seed(M)
    w, x = torch.randn(256, 512, generator=g), torch.randn(M, 512, generator=g)
    t = quantize_int4(w, 64)
    torch.testing.assert_close(qlinear(x, t, FP32_ACTIVATIONS), qlinear_reference(x, t), rtol=1e-4, atol=1e-3)


def vnni_or_skip():
    """This machine kind (Zen 5) has AVX-512 VNNI: there the int8-activation path must be available."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or NATIVE.native512 is None \
            or not NATIVE.native512.has_vnni():
        pytest.skip("no AVX-512 VNNI on this CPU")
    assert NATIVE.act8


@pytest.mark.parametrize("M,N,K,group", [(1, 32, 256, 128), (5, 40, 256, 64), (7, 100, 512, 32),
                                         (100, 256, 512, 64), (130, 1030, 2048, 128)])
def test_act8_kernel_matches_its_reference(M, N, K, group):
    """int4 x int8 (VNNI): the panel kernel equals rounded activations times the dequantized weight for any
    row count, N not a multiple of the 32-row panel, every group size; so does the stored-row kernel for
    groups of 128; a zero group stays zero."""
    vnni_or_skip()
    g = torch.Generator().manual_seed(M * N)
    x, t = torch.randn(M, K, generator=g) * 3, quantize_int4(torch.randn(N, K, generator=g), group)
    x[0, :group] = 0                                                  # a group with max|x| = 0
    got = NATIVE.native512.q4q8_linear(x, t["q"], t["scale"], t["min"], group)
    want = qlinear_act8_reference(x, t)
    assert rel_err(got, want) < 1e-6
    if group % 128 == 0:
        assert rel_err(NATIVE.native512.q4q8_gemv(x, t["q"], t["scale"], t["min"], group), want) < 1e-6
    # and it is close to the fp32-activation product: int8 rounding of activations is a small error
    # next to int4 rounding of the weights (about 10 % here)
    assert rel_err(got, qlinear_reference(x, t)) < 0.01


def test_act8_paths():
    """Where VNNI is present int4 multiplies int8-rounded activations: the panel kernel above PREFILL_ROWS
    rows (or when told it is prefill), the stored-row kernels for fewer rows and for grouped experts; groups
    that are not a multiple of 128 and QWEN36_ACT8=0 keep fp32 activations everywhere."""
    vnni_or_skip()
    g = torch.Generator().manual_seed(1)
    t = quantize_int4(torch.randn(96, 512, generator=g), 128)
    t64 = quantize_int4(torch.randn(96, 512, generator=g), 64)
    big, small = torch.randn(PREFILL_ROWS + 1, 512, generator=g), torch.randn(3, 512, generator=g)
    te = quantize_int4(torch.randn(5, 64, 512, generator=g), 128)
    ids = torch.tensor([4, 1, 4])
    experts = lambda ref: torch.stack([ref(small[i:i + 1], {k: v[e] for k, v in te.items()})[0]
                                       for i, e in enumerate(ids.tolist())])
    act8, fp32 = qlinear_act8_reference, qlinear_reference
    assert rel_err(qlinear(big, t, NATIVE), act8(big, t)) < 1e-6
    assert rel_err(qlinear(small, t, NATIVE), act8(small, t)) < 1e-6
    assert rel_err(qlinear(small, t, NATIVE, prefill=True), act8(small, t)) < 1e-6
    assert rel_err(qlinear(small, t64, NATIVE), fp32(small, t64)) < 1e-6
    assert rel_err(qlinear(big, t64, NATIVE), fp32(big, t64)) < 1e-6
    assert rel_err(qlinear_experts(small, te, ids, NATIVE), experts(act8)) < 1e-6
    assert rel_err(qlinear_experts(small[:1], te, ids, NATIVE), experts(lambda x, w: act8(small[:1], w))) < 1e-6
    assert rel_err(act8(small, t), fp32(small, t)) > 1e-4                    # the two references differ
    for x in (big, small):
        assert rel_err(qlinear(x, t, FP32_ACTIVATIONS), fp32(x, t)) < 1e-6
    assert rel_err(qlinear_experts(small, te, ids, FP32_ACTIVATIONS), experts(fp32)) < 1e-5


def test_native_grouped_experts():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 64, 128, generator=g), torch.randn(4, 128, generator=g)
    t = quantize_int4(w, 64)
    ids = torch.tensor([5, 0, 5, 2])
    got = qlinear_experts(x, t, ids, NATIVE)
    want = torch.stack([qlinear_reference(x[i:i + 1], {k: v[e] for k, v in t.items()})[0]
                        for i, e in enumerate(ids.tolist())])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_max_ram_drops_experts_and_keeps_results(checkpoint, tmp_path):
    """With a limit below anything reachable, experts leave memory after every layer; outputs are unchanged
    (dropped pages come back from the file)."""
    src = checkpoint("ratio4-irregular", seed=2)
    out = quantize_checkpoint(src, tmp_path / "q", "int4", DEFAULT_GROUP)
    ids = list(range(5, 40))
    want = LLM(out, quantization=None).generate(ids, SamplingParams(temperature=0, max_tokens=8)).token_ids
    tight = LLM(out, max_ram=1, quantization=None)
    got = tight.generate(ids, SamplingParams(temperature=0, max_tokens=8)).token_ids
    assert got == want
    r = tight.residency
    assert r.step > 0 and len(r.resident) < len(r.ranges)          # some experts were dropped
    with pytest.raises(ValueError, match="max_ram needs experts stored quantized"):
        LLM(src, max_ram=1 << 30, quantization=None)


@pytest.mark.parametrize("M", [1, 3, 9])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_avx512_and_avx2_int4_kernels_agree_with_reference(M, scale_dtype):
    """Both builds read the same layout: each against the dequantized reference (odd N, fp16 scales too)."""
    exts = [NATIVE.native]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert NATIVE.native512 is not None, "this CPU has AVX-512: the AVX-512 kernels must build"
        exts.append(NATIVE.native512)
    g = torch.Generator().manual_seed(M)
    w, x = torch.randn(97, 256, generator=g), torch.randn(M, 256, generator=g)
    t = quantize_int4(w, 64)
    t = {**t, "scale": t["scale"].to(scale_dtype), "min": t["min"].to(scale_dtype)}
    want = qlinear_reference(x, t)
    for ext in exts:
        got = ext.q4_linear(x, t["q"], t["scale"], t["min"], 64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    we = torch.randn(5, 64, 256, generator=g)
    te = quantize_int4(we, 128)
    ids = torch.tensor([4, 1, 4][:M] + [0] * max(0, M - 3))
    xe = torch.randn(len(ids), 256, generator=g)
    want = torch.stack([qlinear_reference(xe[i:i + 1], {k: v[e] for k, v in te.items()})[0]
                        for i, e in enumerate(ids.tolist())])
    for ext in exts:
        got = ext.q4_moe_linear(xe, te["q"], te["scale"], te["min"], 128, ids)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_grouped_experts_odd_rows():
    """Both builds' grouped kernels take an odd number of output rows (the stored format: fp32 scales)."""
    exts = [NATIVE.native] + ([NATIVE.native512] if NATIVE.native512 is not None else [])
    g = torch.Generator().manual_seed(7)
    te = quantize_int4(torch.randn(3, 33, 128, generator=g), 64)
    ids, xe = torch.tensor([2, 0, 2]), torch.randn(3, 128, generator=g)
    want = torch.stack([qlinear_reference(xe[i:i + 1], {k: v[e] for k, v in te.items()})[0]
                        for i, e in enumerate(ids.tolist())])
    for ext in exts:
        torch.testing.assert_close(ext.q4_moe_linear(xe, te["q"], te["scale"], te["min"], 64, ids), want,
                                   rtol=1e-4, atol=1e-3)


def test_act8_adds_little_to_int4_error(checkpoint):
    """An int4 model with int8 activations against the same with fp32 activations: over a 100-token prefill
    the divergence it adds is a small fraction of int4's own; greedy decoding (the stored-row kernels)
    agrees with full forwards (the panel kernel)."""
    vnni_or_skip()
    path = checkpoint("wide", seed=3)
    ids = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    kl = lambda p, q: float((p.exp() * (p - q)).sum(-1).mean())
    ref = LLM(path, quantization=None).logits(ids).log_softmax(-1)
    q = LLM(path, quantization="int4")
    act8 = q.logits(ids).log_softmax(-1)
    q.model.set_backend(FP32_ACTIVATIONS)
    fp32 = q.logits(ids).log_softmax(-1)
    assert 0 < kl(fp32, act8) < 0.1 * kl(ref, fp32)
    q.model.set_backend(NATIVE)
    out = q.generate(ids, SamplingParams(temperature=0, max_tokens=6)).token_ids
    seq = list(ids)
    for tok in out:
        assert tok == int(q.logits(seq)[-1].argmax())
        seq.append(tok)


def test_sorted_experts_prefill_kernel():
    """Prefill's grouped experts (rows sorted by expert, one kernel call) == a loop over experts with the
    int8-activation reference: every used expert, experts with no rows, one row, and rows not a multiple of 4."""
    vnni_or_skip()
    g = torch.Generator().manual_seed(3)
    te = quantize_int4(torch.randn(6, 40, 256, generator=g), 128)
    counts = [5, 0, 1, 7, 0, 2]
    x = torch.randn(sum(counts), 256, generator=g)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    want = torch.cat([qlinear_act8_reference(x[offsets[e]:offsets[e + 1]], {k: v[e] for k, v in te.items()})
                      for e in range(6) if counts[e]])
    assert sorted_experts_ok(te, NATIVE)
    assert rel_err(qlinear_experts_sorted(x, te, offsets, NATIVE), want) < 1e-6


def test_moe_prefill_sorted_equals_loop(checkpoint):
    """A quantized MoE layer on a prefill-sized step: the sorted grouped path == the per-expert loop."""
    from qwen36.ops.moe import moe, sorted_experts

    vnni_or_skip()
    llm = LLM(checkpoint("wide"), quantization="int4")
    layer = llm.model.layers[0].mlp
    x = torch.randn(50, llm.config.text.hidden_size, generator=torch.Generator().manual_seed(4))
    ids, w = layer.route(x)
    e = layer.experts
    got = sorted_experts(x, ids, w, e.gate_up_proj, e.down_proj, layer.backend)
    want = moe(x, ids, w, e.gate_up_proj, e.down_proj, lambda xe, we: qlinear(xe, we, layer.backend, prefill=True))
    assert got is not None and rel_err(got, want) < 1e-5


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_stacked_experts_quantize_a_few_at_a_time_to_the_same_parts(method):
    """A layer's experts are quantized in slices (bounded temporaries when converting the real model on a
    24 GB machine); the parts equal quantizing them all at once."""
    from qwen36.ops.qformat import QuantConfig, quantize

    w = torch.randn(12, 64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = quantize(w, QuantConfig(method), chunk_bytes=1 << 40)
    sliced = quantize(w, QuantConfig(method), chunk_bytes=3 * 64 * 256 * 4)       # 3 experts a slice
    assert whole.keys() == sliced.keys() and all(torch.equal(whole[k], sliced[k]) for k in whole)
    rows = w[0]                                                                    # a plain [N, K] weight
    whole, sliced = quantize(rows, QuantConfig(method), 1 << 40), quantize(rows, QuantConfig(method), 10 * 256 * 4)
    assert all(torch.equal(whole[k], sliced[k]) for k in whole)
