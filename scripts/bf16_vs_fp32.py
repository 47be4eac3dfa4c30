"""Measure how far bf16 storage and bf16 compute move the logits from fp32 (figures in docs/exactness.md).

    python scripts/bf16_vs_fp32.py
Writes two random official-layout checkpoints to a temporary directory, runs 200 tokens through each
in fp32, in bf16 storage with fp32 compute, and in bf16 compute, and does the same with transformers in
bf16 when it is installed.
"""
from __future__ import annotations

import tempfile

import torch

from qwen36.loader import load_model
from qwen36.synth import DEMO, write_checkpoint

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, linear_num_key_heads=2, linear_key_head_dim=16, linear_num_value_heads=4,
            linear_value_head_dim=24, linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=48, full_attention_interval=4)
N = 200


def _batch_and_cache(m, n):
    cache = m.new_cache(1, n)
    return cache.batch([0], [0], [n], logits="all"), cache


@torch.inference_mode()
def run(path, storage, compute, ids):
    _, m = load_model(path, storage, "cpu", compute_dtype=compute)
    return m(m.embed(ids), *_batch_and_cache(m, len(ids)))


def report(name, tag, got, ref):
    d = (got - ref).abs().max()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    print(f"{name:5s} {tag:28s} max|dlogit| {d:8.4g}  max|logit| {ref.abs().max():7.4g}  top-1 agreement {agree:.3f}")


def main():
    ids = torch.randint(0, 512, (N,), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for name, geo in (("tiny", TINY), ("demo", DEMO)):
            path = write_checkpoint(f"{tmp}/{name}", geo, seed=0)
            ref = run(path, torch.float32, torch.float32, ids)
            report(name, "bf16 storage, fp32 compute", run(path, torch.bfloat16, torch.float32, ids), ref)
            report(name, "bf16 compute", run(path, torch.bfloat16, torch.bfloat16, ids), ref)
            try:
                from qwen36.reference import reference_classes
                hf_class = reference_classes()[1]
            except ImportError:
                continue
            hf = hf_class.from_pretrained(path, dtype=torch.bfloat16).eval()
            with torch.no_grad():
                report(name, "transformers bf16", hf(input_ids=ids[None]).logits[0].float(), ref)


if __name__ == "__main__":
    main()
