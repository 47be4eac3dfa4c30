"""Qwen's block-FP8 checkpoints (Qwen/Qwen3.6-35B-A3B-FP8's layout): read as the float weights they stand for.

The reference is fed the dequantized weights (a float checkpoint written from the FP8 one), so the comparison
is as exact as any fp32 one. Blocks here are 32 x 48 (non-square, and partial at most edges of these small
widths), so a swapped or floor-sized scale grid cannot pass.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen36 import LLM, CheckpointError, SamplingParams
from qwen36.checkpoint import Checkpoint, dequantize_fp8
from qwen36.loader import load_model
from qwen36.export import quantized_tensors
from qwen36.synth import quantize_fp8, to_fp8_checkpoint, write_dequantized

from conftest import load_reference, rel_err

BLOCK = (32, 48)
LM = "model.language_model."
FLOAT = dict(dtype="float32", quantization=None)          # said, not left to the defaults


@pytest.fixture(scope="module")
def fp8(checkpoint, tmp_path_factory):
    """(FP8 checkpoint, its dequantized fp32 twin, the bf16 source) from the ratio2 geometry, per-expert like
    Qwen's."""
    src = checkpoint("ratio2", seed=11)
    root = tmp_path_factory.mktemp("fp8")
    q = to_fp8_checkpoint(src, root / "fp8", block=BLOCK, scale_dtype=torch.bfloat16)
    return q, write_dequantized(q, root / "deq32", torch.float32), src


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_dequantize_is_fp8_times_its_block_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 70, 100, generator=g)                       # partial edge blocks on both axes
    q, s = quantize_fp8(w, BLOCK, torch.float32)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3, 3)
    rows = torch.arange(70) // BLOCK[0]
    cols = torch.arange(100) // BLOCK[1]
    want = q.float() * s[:, rows][:, :, cols]                      # element by element: its own block's scale
    assert torch.equal(dequantize_fp8(q, s, BLOCK), want)
    assert torch.equal(dequantize_fp8(q, s.bfloat16(), BLOCK, torch.bfloat16),
                       (q.float() * s.bfloat16().float()[:, rows][:, :, cols]).bfloat16())
    assert float(((want - w).abs() / w.abs().clamp_min(0.05)).max()) < 0.07    # within e4m3's half step


def test_layout_as_qwen_ships_it(fp8):
    q, _, src = fp8
    ckpt = Checkpoint(q)
    stored = ckpt.dtype_str
    e3 = LM + "layers.0.mlp.experts.3.gate_proj.weight"             # routed experts: per expert, FP8
    assert stored(e3) == "F8_E4M3" and stored(e3 + "_scale_inv") == "BF16"
    assert ckpt._open(ckpt.stored[e3 + "_scale_inv"]).shape(e3 + "_scale_inv") == (1, 2)   # 32 x 64 in 32 x 48
    for name in (LM + "layers.0.linear_attn.in_proj_qkv.weight", LM + "layers.3.self_attn.q_proj.weight",
                 LM + "layers.1.mlp.shared_expert.down_proj.weight", "mtp.layers.0.mlp.experts.0.down_proj.weight",
                 "mtp.layers.0.self_attn.o_proj.weight"):
        assert stored(name) == "F8_E4M3", name
    for name in (LM + "embed_tokens.weight", "lm_head.weight", LM + "layers.0.mlp.gate.weight",
                 LM + "layers.0.mlp.shared_expert_gate.weight", LM + "layers.0.linear_attn.in_proj_a.weight",
                 LM + "layers.0.linear_attn.in_proj_b.weight", "mtp.fc.weight", "model.visual.blocks.0.attn.qkv.weight"):
        assert stored(name) == "BF16", name
    # each weight reads as its codes times its own block's scale, and stands for the source weight
    source = Checkpoint(src)
    for name in (e3, LM + "layers.1.mlp.experts.0.down_proj.weight", LM + "layers.0.linear_attn.in_proj_z.weight",
                 LM + "layers.3.self_attn.o_proj.weight", "mtp.layers.0.mlp.shared_expert.up_proj.weight"):
        codes, scale = ckpt._open(ckpt.stored[name]).tensor(name), ckpt._open(ckpt.stored[name + "_scale_inv"]).tensor(name + "_scale_inv")
        N, K = codes.shape
        want = codes.float() * scale.float()[torch.arange(N) // BLOCK[0]][:, torch.arange(K) // BLOCK[1]]
        got = ckpt.tensor(name)
        assert torch.equal(got, want), name
        if name == e3:                                            # the source's experts are fused
            orig = source.tensor(LM + "layers.0.mlp.experts.gate_up_proj")[3, :N]
        elif ".experts.0.down_proj" in name:
            orig = source.tensor(LM + "layers.1.mlp.experts.down_proj")[0]
        else:
            orig = source.tensor(name)
        orig = orig.float()
        step = scale.float().max() * 2 ** -9                      # e4m3's smallest step, in this tensor's scale
        assert bool(((got - orig).abs() <= orig.abs() / 16 + step).all()), name      # within half a step
    # the scales are not tensors of the model: the FP8 weights read as fp32 (dequantized)
    assert not any(n.endswith("_scale_inv") for n in ckpt.names())
    assert ckpt.tensor(e3).dtype == torch.float32
    cfg = json.loads((q / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fp8" and cfg["weight_block_size"] == list(BLOCK)


def test_logits_match_transformers_on_dequantized_weights(fp8):
    q, deq, _ = fp8
    ours, ref, twin = LLM(q, **FLOAT), load_reference(deq), LLM(deq, **FLOAT)
    assert ours.config.fp8 is not None and ours.config.quantization is None
    for n in (1, 70):
        ids = prompt(n, seed=n)
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([ids])).logits[0]
        got = ours.logits(ids)
        assert rel_err(got, want) < 1e-4, n
        assert torch.equal(got, twin.logits(ids))        # the same weights as the dequantized checkpoint's


def test_int4_from_fp8_equals_int4_from_dequantized_bf16(fp8, tmp_path):
    q, _, _ = fp8
    deq16 = write_dequantized(q, tmp_path / "deq16", torch.bfloat16)
    a = quantized_tensors(load_model(q, torch.bfloat16, quantization="int4")[1])
    b = quantized_tensors(load_model(deq16, torch.bfloat16, quantization="int4")[1])
    assert any(k.endswith("experts.gate_up_proj.q") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = prompt(40, seed=3)
    out = LLM(q, dtype="bfloat16", quantization="int4").generate(ids, SamplingParams(temperature=0, max_tokens=4))
    assert len(out.token_ids) == 4


def test_fused_fp8_experts_equal_per_expert(checkpoint, fp8, tmp_path):
    q, _, _ = fp8
    fused = to_fp8_checkpoint(checkpoint("ratio2", seed=11), tmp_path / "fused", block=BLOCK, per_expert=False)
    assert Checkpoint(fused).dtype_str(LM + "layers.0.mlp.experts.gate_up_proj") == "F8_E4M3"
    ids = prompt(30, seed=4)
    assert torch.equal(LLM(fused, **FLOAT).logits(ids), LLM(q, **FLOAT).logits(ids))


def test_mtp_head_reads_fp8(fp8):
    q, deq, _ = fp8
    a, b = load_model(q, mtp=True)[1].mtp.state_dict(), load_model(deq, mtp=True)[1].mtp.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rewrite(path, name, tensor):
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    file = path / idx["weight_map"][name]
    tensors = load_file(str(file))
    if tensor is None:
        del tensors[name], idx["weight_map"][name]
    else:
        tensors[name] = tensor
    save_file(tensors, str(file), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_missing_scale_and_wrong_scale_shape_are_named(fp8, tmp_path):
    q, _, _ = fp8
    name = LM + "layers.1.mlp.experts.2.up_proj.weight"
    bad = tmp_path / "noscale"
    shutil.copytree(q, bad)
    _rewrite(bad, name + "_scale_inv", None)
    with pytest.raises(CheckpointError) as e:
        LLM(bad, **FLOAT)
    assert name in str(e.value) and "F8_E4M3" in str(e.value) and "_scale_inv" in str(e.value)
    bad = tmp_path / "badscale"
    shutil.copytree(q, bad)
    _rewrite(bad, name + "_scale_inv", torch.ones(2, 2, dtype=torch.bfloat16))    # floor-sized: 32 x 64 needs 1 x 2
    with pytest.raises(CheckpointError) as e:
        LLM(bad, **FLOAT)
    assert name + "_scale_inv" in str(e.value) and "[2, 2]" in str(e.value) and "[1, 2]" in str(e.value)
