"""transformers' Qwen3_5Moe classes (the reference) on their exact torch path.

transformers runs the gated delta rule through fla-core's Triton kernels whenever `fla` imports, decided when
its model module is first imported. Those kernels are not the reference (their fp32 dots may round through
tf32), and without a GPU Triton has no driver at all. So the module is imported with fla hidden; fla stays
importable for our own GPU path afterwards.
"""
from __future__ import annotations

import sys


def reference_classes():
    """(Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration) with the torch path of the delta rule."""
    missing = object()
    saved = sys.modules.get("fla", missing)
    sys.modules["fla"] = None
    try:
        from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m
    finally:
        if saved is missing:
            del sys.modules["fla"]
        else:
            sys.modules["fla"] = saved
    return m.Qwen3_5MoeForCausalLM, m.Qwen3_5MoeForConditionalGeneration
