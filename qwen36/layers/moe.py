"""Sparse MoE block: fp32 softmax router over all experts, top-k, renormalised; routed experts plus a
sigmoid-gated shared expert."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .. import kernels
from ..kernels import PREFILL_ROWS
from ..ops.moe import float_linear, grouped_ok, moe, moe_grouped
from .linear import Linear


GROUPED_ROWS = 64          # (token, expert) pairs up to which quantized experts run as one grouped call
FUSED = os.environ.get("QWEN36_FUSED") != "0"   # decode-sized steps through SparseMoE.fused (tests compare)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter)
        self.up_proj = Linear(hidden, inter)
        self.down_proj = Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Fused expert weights, as on disk: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""
    linear = staticmethod(float_linear)                       # how one expert's weight multiplies x

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter), requires_grad=False)


class SparseMoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        H = cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.gate = Linear(H, cfg.num_experts)                                 # router
        self.experts = Experts(cfg.num_experts, H, cfg.moe_intermediate_size)
        self.shared_expert = MLP(H, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(H, 1)
        self._fusable: bool | None = None        # whether `fused` applies (decided at first use)

    def route(self, x: torch.Tensor):
        """x [N, H] -> (expert ids [N, k], weights [N, k] in x's dtype)."""
        logits = self.gate(x)
        w, ids = torch.topk(logits.float().softmax(-1), self.top_k, dim=-1)
        return ids, (w / w.sum(-1, keepdim=True)).to(logits.dtype)

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole block in one native call for a decode-sized step (kernels.moe_decode), where the
        weights are int4 for the int8-activation kernels and nothing watches expert use; else None.
        Routing as `route` (softmax, top k, renormalised); the same arithmetic for every row count."""
        e, s = self.experts, self.shared_expert
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[0] * self.top_k > GROUPED_ROWS \
                or getattr(e, "on_use", None) is not None or not kernels.act8():
            return None
        if self._fusable is None:          # the weights' kinds do not change once loaded: decided once
            self._fusable = (hasattr(e, "grouped") and hasattr(s.gate_proj, "packed")
                             and self.gate.weight.dtype == torch.float32 and self.gate.bias is None
                             and self.shared_expert_gate.weight.dtype == torch.float32
                             and self.shared_expert_gate.bias is None
                             and kernels.fused_ok([e.gate_up_proj.tensors, e.down_proj.tensors, s.gate_proj.packed,
                                                   s.up_proj.packed, s.down_proj.packed]))
        if not self._fusable:
            return None
        return kernels.moe_decode(x, self.gate.weight, self.top_k, [e.gate_up_proj.tensors, e.down_proj.tensors],
                                  [s.gate_proj.packed, s.up_proj.packed, s.down_proj.packed],
                                  self.shared_expert_gate.weight)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fused(x) if FUSED else None
        if out is not None:
            return out
        ids, w = self.route(x)
        e = self.experts
        if getattr(e, "on_use", None) is not None:
            e.on_use(ids)
        if getattr(e, "offloaded", False):     # experts in CPU memory (--cpu-experts): the activations cross,
            xc, idc, wc = x.to("cpu", torch.float32), ids.cpu(), w.to("cpu", torch.float32)
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)   # queued: the GPU runs
            return self.routed(xc, idc, wc).to(x.device, x.dtype) + shared               # it while the CPU works
        return self.routed(x, ids, w) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def routed(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for x [N, H] routed to ids / w [N, k], by the fastest path the
        weights and the device allow."""
        e = self.experts
        routed = None
        if x.device.type != "cpu" and isinstance(e, Experts) and grouped_ok(x, e.gate_up_proj):
            routed = moe_grouped(x, ids, w, e.gate_up_proj, e.down_proj)     # GPU: no host read, graph-safe
        elif x.shape[0] * self.top_k <= GROUPED_ROWS and hasattr(e, "grouped"):
            routed = e.grouped(x, ids, w)
        elif hasattr(e, "sorted_prefill"):
            routed = e.sorted_prefill(x, ids, w)
        if routed is None:  # a large step: each expert's rows are few, but the step counts as prefill
            linear = getattr(e, "prefill_linear", e.linear) if x.shape[0] > PREFILL_ROWS else e.linear
            routed = moe(x, ids, w, e.gate_up_proj, e.down_proj, linear)
        return routed
