"""Logits and greedy continuations against transformers' Qwen3_5MoeForConditionalGeneration (fp32)."""
from __future__ import annotations

import pytest
import torch

from qwen36 import LLM, SamplingParams

from conftest import GEOMETRIES, load_reference, rel_err

CASES = [(name, experts) for name in GEOMETRIES for experts in ("fused", "per_expert")]


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name,experts", CASES)
def test_logits_match_transformers(checkpoint, name, experts):
    path = checkpoint(name, seed=3, fused_experts=experts == "fused")
    ours, ref = LLM(path, quantization=None), load_reference(path)
    for n in (1, 70, 135):
        ids = prompt(n, 512, seed=n)
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([ids])).logits[0]
        got = ours.logits(ids)
        assert got.shape == (n, 512) and got.dtype == torch.float32
        assert rel_err(got, want) < 1e-4, f"{name}/{experts} len {n}"


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_greedy_continuation_matches_transformers(checkpoint, name):
    path = checkpoint(name, seed=5)
    ours, ref = LLM(path, quantization=None), load_reference(path)
    for n in (1, 9, 66):
        ids = prompt(n, 512, seed=100 + n)
        with torch.no_grad():
            x = torch.tensor([ids])  # explicit mask: generate would otherwise treat pad_token_id tokens as padding
            want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, eos_token_id=None, pad_token_id=0)[0, n:].tolist()
        got = ours.generate(ids, SamplingParams(temperature=0, max_tokens=16))
        assert got.token_ids == want, f"{name} prompt {n}"
        assert got.finish_reason == "length"


def test_text_only_checkpoint_matches_transformers(checkpoint):
    path = checkpoint("ratio2", seed=7, text_only=True, fused_experts=False)
    ours, ref = LLM(path, quantization=None), load_reference(path, text_only=True)
    ids = prompt(80, 512, seed=1)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    assert rel_err(ours.logits(ids), want) < 1e-4


def test_bf16_storage_close_to_fp32(checkpoint):
    """bf16 weights (as on disk) with fp32 compute give the same logits as fp32 weights: the values are
    bf16 on disk either way, so only the activations' precision could differ, and it is fp32 in both."""
    path = checkpoint("ratio2", seed=3)
    ids = prompt(70, 512, seed=2)
    a = LLM(path, dtype="float32", quantization=None).logits(ids)
    b = LLM(path, dtype="bfloat16", quantization=None).logits(ids)
    assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_saved_by_transformers(tmp_path, tied):
    """A model built and saved by transformers itself (its own names, dtypes, single file, no tokenizer):
    attention biases, 3 KV heads, value/key ratio 3, odd dims, tied or untied embeddings."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=48, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3,
                head_dim=16, linear_num_key_heads=2, linear_key_head_dim=12, linear_num_value_heads=6,
                linear_value_head_dim=10, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=20,
                shared_expert_intermediate_size=28, attention_bias=True, tie_word_embeddings=tied,
                layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=48, patch_size=4,
                  num_position_embeddings=16)
    ref = Qwen3_5MoeForConditionalGeneration(
        Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for p in ref.parameters():  # move every weight off its init value (zero norms, ones, ...)
            p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    ours = LLM(tmp_path, quantization=None)
    ids = prompt(80, 300, seed=4)
    with torch.no_grad():
        want_logits = ref(input_ids=torch.tensor([ids])).logits[0]
        x = torch.tensor([ids])
        want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)[0, 80:].tolist()
    assert rel_err(ours.logits(ids), want_logits) < 1e-4
    assert ours.generate(ids, SamplingParams(temperature=0, max_tokens=12)).token_ids == want
