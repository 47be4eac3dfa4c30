"""Quality of int8 / int4 weight-only quantization against the unquantized model (docs/quantization.md table).

    python scripts/quant_quality.py CHECKPOINT [--tokens 256]
For each method: mean KL(fp32 || quantized) of the next-token distributions and top-1 agreement over a
fixed random token sequence (seed 0), one forward pass each. On CPUs with AVX-512 VNNI, int4 with groups of
128 multiplies int8-rounded activations (ops/linear.py); the last row repeats it with fp32 activations
(QWEN36_ACT8=0) to show what that rounding adds.
"""
from __future__ import annotations

import argparse
import gc
import os

import torch

from qwen36.loader import load_model


@torch.inference_mode()
def logits(path, quantization=None, group=128, ids=None):
    _, m = load_model(path, torch.bfloat16, "cpu", quantization=quantization, group_size=group)
    cache = m.new_cache(1, len(ids))
    out = m(m.embed(ids), cache.batch([0], [0], [len(ids)], logits="all"), cache).log_softmax(-1)
    del m, cache
    gc.collect()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    ids = torch.randint(0, 200000, (args.tokens,), generator=torch.Generator().manual_seed(0))
    ref = logits(args.checkpoint, ids=ids)
    print("| method | mean KL (nats) | top-1 agreement |")
    print("|---|---|---|")
    for method, group, act8 in (("int8", 0, True), ("int4", 32, True), ("int4", 64, True), ("int4", 128, True),
                                ("int4", 128, False)):
        os.environ["QWEN36_ACT8"] = "1" if act8 else "0"
        got = logits(args.checkpoint, method, group or 128, ids)
        kl = float((ref.exp() * (ref - got)).sum(-1).mean())
        top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
        name = method if method == "int8" else f"int4, group {group}" + ("" if act8 else ", fp32 activations")
        print(f"| {name} | {kl:.4f} | {100 * top1:.1f} % |")


if __name__ == "__main__":
    main()
