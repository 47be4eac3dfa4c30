"""How far bf16 compute moves the logits from fp32, ours against transformers' own bf16 run (docs/exactness.md, GPU
section): what a GPU computes, simulated on the CPU (the tensor-op path, CPU kernels off).

    python scripts/bf16_drift.py [--seeds 3 4 5 6] [--prompts 8]
Per random checkpoint (every expert routed, k = E, so routing is continuous), the mean over prompts of
max|logit - fp32 logit| / max|fp32 logit| for ours in bf16 and transformers in bf16, and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from qwen36.loader import load_model
from qwen36.ops.backend import ComputeConfig
from qwen36.synth import write_checkpoint

GEOMETRY = dict(vocab_size=248320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, linear_num_key_heads=2, linear_key_head_dim=16, linear_num_value_heads=4,
                linear_value_head_dim=24, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=4,
                moe_intermediate_size=32, shared_expert_intermediate_size=48, full_attention_interval=4)


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@torch.inference_mode()
def main() -> None:
    from qwen36.reference import reference_classes

    Ref = reference_classes()[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5, 6])
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    tensor_ops = ComputeConfig(native=False)              # the tensor-op path a GPU takes
    for seed in args.seeds:
        path = write_checkpoint(tempfile.mkdtemp(), GEOMETRY, seed=seed, tokenizer=True)
        ref32 = Ref.from_pretrained(path, dtype=torch.float32).eval()
        ref16 = Ref.from_pretrained(path, dtype=torch.bfloat16).eval()
        _, ours = load_model(path, torch.bfloat16, "cpu", compute_dtype=torch.bfloat16, compute=tensor_ops)
        o, t = [], []
        for p in range(args.prompts):
            ids = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(100 + p))
            want = ref32(input_ids=ids[None]).logits[0]
            cache = ours.new_cache(1, 64)
            o.append(rel(ours(ours.embed(ids), cache.batch([0], [0], [64], logits="all"), cache), want))
            t.append(rel(ref16(input_ids=ids[None]).logits[0], want))
        print(f"seed {seed}: ours {statistics.mean(o):.4f}  transformers {statistics.mean(t):.4f}  "
              f"ratio {statistics.mean(o) / statistics.mean(t):.2f}", flush=True)


if __name__ == "__main__":
    main()
