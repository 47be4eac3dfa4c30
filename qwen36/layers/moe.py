"""Sparse MoE block: fp32 softmax router over all experts, top-k, renormalised; routed experts plus a
sigmoid-gated shared expert."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..ops.backend import GROUPED_ROWS, UsesBackend
from ..ops.linear import fused_ok
from ..ops.moe import moe_decode, routed_experts
from .linear import Linear
from .quant import QuantExperts, QuantLinear


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
    on_use = None               # (quantized experts only: residency.py watches which experts ran)
    offloaded = False           # (quantized experts only: in CPU memory for a model elsewhere)

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter), requires_grad=False)


class SparseMoE(UsesBackend, nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        H = cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.gate = Linear(H, cfg.num_experts)                                 # router
        self.experts = Experts(cfg.num_experts, H, cfg.moe_intermediate_size)
        self.shared_expert = MLP(H, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(H, 1)
        self._fusable: tuple | None = None       # (backend, whether `fused` applies), decided at first use

    def route(self, x: torch.Tensor):
        """x [N, H] -> (expert ids [N, k], weights [N, k] in x's dtype)."""
        logits = self.gate(x)
        w, ids = torch.topk(logits.float().softmax(-1), self.top_k, dim=-1)
        return ids, (w / w.sum(-1, keepdim=True)).to(logits.dtype)

    def decode_args(self) -> tuple | None:
        """The arguments of `ops.moe.moe_decode` after x (router, top k, routed experts' parts, shared
        expert's parts, shared-expert gate), where the weights allow the one-call block: int4 for the
        int8-activation kernels, float router and shared-expert gate without bias; else None."""
        e, s = self.experts, self.shared_expert
        if not (isinstance(e, QuantExperts) and all(isinstance(m, QuantLinear) for m in s.children())
                and self.gate.weight.dtype == torch.float32 and self.gate.bias is None
                and self.shared_expert_gate.weight.dtype == torch.float32 and self.shared_expert_gate.bias is None):
            return None
        args = self._moe_args()
        return args if fused_ok([*args[2], *args[3]], self.backend) else None

    def _moe_args(self) -> tuple:
        e, s = self.experts, self.shared_expert
        return (self.gate.weight, self.top_k, [e.gate_up_proj.tensors, e.down_proj.tensors],
                [s.gate_proj.packed, s.up_proj.packed, s.down_proj.packed], self.shared_expert_gate.weight)

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole block in one native call for a decode-sized step (ops.moe.moe_decode), where the backend
        and the weights allow it and nothing watches expert use; else None. Routing as `route` (softmax,
        top k, renormalised); the same arithmetic for every row count."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[0] * self.top_k > GROUPED_ROWS \
                or self.experts.on_use is not None or not self.backend.fused_moe:
            return None
        if self._fusable is None or self._fusable[0] is not self.backend:
            # the weights' kinds do not change once loaded: decided once per backend
            self._fusable = self.backend, self.decode_args() is not None
        if not self._fusable[1]:
            return None
        return moe_decode(x, *self._moe_args(), self.backend)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fused(x)
        if out is not None:
            return out
        ids, w = self.route(x)
        e = self.experts
        if e.on_use is not None:
            e.on_use(ids)
        if e.offloaded:     # experts in CPU memory (--cpu-experts): the activations cross,
            xc, idc, wc = x.to("cpu", torch.float32), ids.cpu(), w.to("cpu", torch.float32)
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)   # queued: the GPU runs
            return self.routed(xc, idc, wc).to(x.device, x.dtype) + shared               # it while the CPU works
        return self.routed(x, ids, w) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def routed(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for x [N, H] routed to ids / w [N, k] (ops.moe.routed_experts)."""
        return routed_experts(x, ids, w, self.experts.gate_up_proj, self.experts.down_proj, self.backend)
