"""Loader: layouts it accepts, and errors that name the file and the tensor for everything it rejects."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen36 import LLM, CheckpointError
from qwen36.checkpoint import Checkpoint, map_name

from conftest import rel_err

IDS = list(range(1, 40))


@pytest.fixture
def ckpt(checkpoint, tmp_path) -> Path:
    """A fresh, writable copy of a sharded official-layout checkpoint (with vision tower and MTP block)."""
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint("ratio2", seed=21, tokenizer=False), out)
    return out


def index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def shard_of(path: Path, name: str) -> Path:
    return path / index(path)["weight_map"][name]


def rewrite(path: Path, name: str, tensor: torch.Tensor | None, new_name: str | None = None):
    """Replace (or drop, or add under new_name) one tensor in its shard and keep the index consistent."""
    file = shard_of(path, name)
    tensors = load_file(str(file))
    idx = index(path)
    if tensor is None:
        del tensors[name]
        del idx["weight_map"][name]
    else:
        key = new_name or name
        tensors[key] = tensor
        idx["weight_map"][key] = file.name
    save_file(tensors, str(file), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_recognises_vision_and_mtp_and_loads(ckpt):
    names = Checkpoint(ckpt).names()
    assert any(n.startswith("model.visual.") for n in names)
    assert any(n.startswith("mtp.layers.0.mlp.experts.7.") for n in names)
    assert LLM(ckpt, quantization=None).logits(IDS).shape == (len(IDS), 512)


def test_single_file_checkpoint(ckpt, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    tensors = {}
    for f in set(index(ckpt)["weight_map"].values()):
        tensors.update(load_file(str(ckpt / f)))
    save_file(tensors, str(single / "model.safetensors"))
    for f in ("config.json", "generation_config.json"):
        shutil.copy(ckpt / f, single / f)
    assert rel_err(LLM(single, quantization=None).logits(IDS), LLM(ckpt, quantization=None).logits(IDS)) == 0


def test_per_expert_equals_fused(checkpoint):
    fused = LLM(checkpoint("ratio2", seed=4, fused_experts=True), quantization=None).logits(IDS)
    per = LLM(checkpoint("ratio2", seed=4, fused_experts=False), quantization=None).logits(IDS)
    assert rel_err(per, fused) == 0


def test_name_map():
    assert map_name("model.language_model.layers.3.self_attn.q_proj.weight") == "layers.3.self_attn.q_proj.weight"
    assert map_name("model.layers.0.mlp.gate.weight") == "layers.0.mlp.gate.weight"
    assert map_name("lm_head.weight") == "lm_head.weight"
    assert map_name("model.visual.blocks.0.attn.qkv.weight") == ""
    assert map_name("mtp.fc.weight") == ""
    assert map_name("something.else") is None


def error_of(path) -> str:
    with pytest.raises(CheckpointError) as e:
        LLM(path, quantization=None)
    return str(e.value)


def test_missing_shard(ckpt):
    victim = "model.language_model.layers.1.mlp.experts.down_proj"
    file = shard_of(ckpt, victim)
    file.unlink()
    msg = error_of(ckpt)
    assert "missing shard" in msg and file.name in msg


def test_missing_tensor(ckpt):
    victim = "model.language_model.layers.2.linear_attn.A_log"
    rewrite(ckpt, victim, None)
    msg = error_of(ckpt)
    assert "missing tensor" in msg and victim in msg


def test_missing_lm_head(ckpt):
    rewrite(ckpt, "lm_head.weight", None)
    assert "missing tensor 'lm_head.weight'" in error_of(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, "model.language_model.norm.weight", torch.zeros(4), new_name="model.language_model.layers.0.bogus.weight")
    msg = error_of(ckpt)
    assert "unexpected" in msg and "model.language_model.layers.0.bogus.weight" in msg


def test_wrong_shape(ckpt):
    victim = "model.language_model.layers.3.self_attn.k_proj.weight"
    rewrite(ckpt, victim, torch.zeros(32, 64, dtype=torch.bfloat16))
    msg = error_of(ckpt)
    assert victim in msg and "[32, 64]" in msg and "[64, 64]" in msg and shard_of(ckpt, victim).name in msg


def test_unsupported_dtype(ckpt):
    victim = "model.language_model.layers.0.mlp.shared_expert.up_proj.weight"
    rewrite(ckpt, victim, torch.zeros(48, 64, dtype=torch.int32))
    msg = error_of(ckpt)
    assert victim in msg and "I32" in msg and "dtype" in msg


def test_fp8_without_its_scales_named(ckpt):
    """An FP8 weight reads only with its block scales (`_scale_inv`, as Qwen's -FP8 checkpoints ship them)."""
    victim = "model.language_model.layers.0.mlp.shared_expert.up_proj.weight"
    rewrite(ckpt, victim, torch.zeros(48, 64, dtype=torch.float8_e4m3fn))
    msg = error_of(ckpt)
    assert victim in msg and "F8_E4M3" in msg and victim + "_scale_inv" in msg


def test_fp8_weight_with_scales_reads_as_float(ckpt, tmp_path):
    """The reader takes F8_E4M3 with its `_scale_inv`: here a weight of FP8 codes times power-of-two block scales,
    whose float value (exact in bf16) is known without our dequantizer; the model equals one given that value."""
    victim = "model.language_model.layers.0.mlp.shared_expert.up_proj.weight"
    plain = tmp_path / "plain"
    shutil.copytree(ckpt, plain)
    w = Checkpoint(ckpt).tensor(victim).float()
    scale = torch.tensor([[2.0 ** -6, 2.0 ** -5]])                       # one block of 128 rows, 2 of 32 columns
    codes = (w / scale.repeat_interleave(32, 1)).to(torch.float8_e4m3fn)
    value = codes.float() * scale.repeat_interleave(32, 1)
    rewrite(plain, victim, value.bfloat16())
    rewrite(ckpt, victim, codes)
    rewrite(ckpt, victim, scale, new_name=victim + "_scale_inv")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 32]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    c = Checkpoint(ckpt)                                                 # the block size read from config.json
    assert c.dtype_str(victim) == "F8_E4M3" and victim + "_scale_inv" not in c.names()
    assert torch.equal(c.tensor(victim), value)
    assert torch.equal(LLM(ckpt, dtype="float32", quantization=None).logits(IDS),
                       LLM(plain, dtype="float32", quantization=None).logits(IDS))


def test_truncated_file(ckpt):
    file = shard_of(ckpt, "lm_head.weight")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    msg = error_of(ckpt)
    assert "truncated" in msg and file.name in msg


def test_corrupt_header(ckpt):
    file = shard_of(ckpt, "lm_head.weight")
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff" * 8
    file.write_bytes(bytes(data))
    msg = error_of(ckpt)
    assert "corrupt" in msg and file.name in msg


def test_empty_file(ckpt):
    file = shard_of(ckpt, "lm_head.weight")
    file.write_bytes(b"")
    msg = error_of(ckpt)
    assert "truncated or corrupt" in msg and file.name in msg


def test_index_points_to_wrong_file(ckpt):
    idx = index(ckpt)
    files = sorted(set(idx["weight_map"].values()))
    name = next(n for n, f in idx["weight_map"].items() if f == files[0])
    idx["weight_map"][name] = files[1]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    msg = error_of(ckpt)
    assert name in msg and files[1] in msg


def test_bad_index_json(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    assert "model.safetensors.index.json" in error_of(ckpt)


def test_no_weights(ckpt):
    for f in ckpt.glob("model*"):
        f.unlink()
    assert "neither model.safetensors.index.json nor model.safetensors" in error_of(ckpt)


def test_per_expert_missing_expert(checkpoint, tmp_path):
    out = tmp_path / "pe"
    shutil.copytree(checkpoint("ratio2", seed=4, fused_experts=False), out)
    victim = "model.language_model.layers.1.mlp.experts.5.up_proj.weight"
    rewrite(out, victim, None)
    msg = error_of(out)
    assert "missing tensor" in msg and victim in msg


def test_mixed_fused_and_per_expert(ckpt):
    rewrite(ckpt, "model.language_model.norm.weight", torch.zeros(32, 64, dtype=torch.bfloat16),
            new_name="model.language_model.layers.0.mlp.experts.0.gate_proj.weight")
    assert "both fused and per-expert" in error_of(ckpt)
