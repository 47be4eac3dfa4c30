"""Weight-only quantization of a model (int8, int4): which weights are quantized, and the pass that swaps
their modules for quantized ones. The formats and their math are in ops/qformat.py, the quantized modules in
layers/quant.py, the kernels in ops/linear.py and ops/moe.py.

What stays in high precision, and why: the router (`mlp.gate`: a ranking, small), the shared-expert gate
(one row), DeltaNet's `in_proj_a/b` (feed the decay and beta; tiny), conv1d, A_log, dt_bias, every norm,
and the embedding (one row is read per token, so quantizing it saves memory but no time).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers.linear import Linear
from .layers.moe import Experts
from .layers.quant import QuantExperts, QuantLinear
from .ops.qformat import QuantConfig

# Which weights are quantized: every projection of the decoder and the output head. Kept float: the
# router, shared-expert gate, DeltaNet in_proj_a/b, conv, norms, embedding (reasons at the top).
QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj",
                     "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")


def is_quantized(name: str) -> bool:
    """Whether the weight `name` (our naming) is stored quantized."""
    base = name.rsplit(".", 1)[0]
    return (name == "lm_head.weight" or name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
            or (name.endswith(".weight") and base.endswith(QUANTIZED_LINEARS)))


def quantize_modules(model: nn.Module, cfg: QuantConfig) -> dict[str, tuple[nn.Module, str]]:
    """Swap the model's quantizable modules for quantized ones (a pass over an unchanged model).
    Returns weight name -> (module that loads it, part name): see `load_target`."""
    targets = {}
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, Linear) and is_quantized(f"{name}.weight"):
            q = QuantLinear(module.weight.shape[1], module.weight.shape[0], cfg, module.bias is not None)
            setattr(parent, child, q)
            targets[f"{name}.weight"] = (q, "weight")
        elif isinstance(module, Experts):
            E, two_i, H = module.gate_up_proj.shape
            q = QuantExperts(E, H, two_i // 2, cfg)
            setattr(parent, child, q)
            targets[f"{name}.gate_up_proj"] = (q, "gate_up_proj")
            targets[f"{name}.down_proj"] = (q, "down_proj")
    return targets


def load_target(target: tuple[nn.Module, str], parts: dict[str, torch.Tensor]) -> None:
    """Give a quantized module (a target of `quantize_modules` / `offload_experts`) a weight's parts."""
    module, part = target
    if isinstance(module, QuantExperts):
        module.load(part, parts)
    else:
        module.load(parts)


def offload_experts(model: nn.Module, layers, cfg: QuantConfig) -> dict[str, tuple[nn.Module, str]]:
    """--cpu-experts (llama.cpp's --n-cpu-moe): the routed experts of `layers` become quantized experts in CPU
    memory, run by the CPU kernels, while the rest of the model is on its device; the MoE block sends them
    its activations and takes their sum back (layers/moe.py). Returns weight name -> (module, part)."""
    targets = {}
    for i in layers:
        mlp = model.layers[i].mlp
        E, two_i, H = mlp.experts.gate_up_proj.shape
        mlp.experts = QuantExperts(E, H, two_i // 2, cfg)
        mlp.experts.offloaded = True
        for part in ("gate_up_proj", "down_proj"):
            targets[f"layers.{i}.mlp.experts.{part}"] = (mlp.experts, part)
    return targets
