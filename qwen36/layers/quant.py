"""Modules with quantized weights (formats in ops/qformat.py), drop-ins for the float ones.

  QuantLinear    for layers.linear.Linear: the weight's parts as stored; bias (if any) stays float
  QuantExperts   for layers.moe.Experts: gate_up [E, 2I, H] and down [E, H, I], quantized per expert
quant.quantize_modules swaps them in (a pass over an unchanged model).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.backend import UsesBackend
from ..ops.linear import qlinear
from ..ops.qformat import QuantConfig, StackedQuant


class QuantLinear(UsesBackend, nn.Module):
    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        self.packed: dict[str, torch.Tensor] | None = None     # the stored parts (q, scale[, min]), set by load()
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load(self, t: dict[str, torch.Tensor]) -> None:
        self.packed = {k: v.contiguous() for k, v in t.items()}

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored format (q, scale[, min]) of the weight."""
        return self.packed

    @property
    def kernel_weight(self) -> dict[str, torch.Tensor]:
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = qlinear(x, self.packed, self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantExperts(nn.Module):
    def __init__(self, n: int, hidden: int, inter: int, cfg: QuantConfig):
        super().__init__()
        self.n, self.hidden, self.inter, self.cfg = n, hidden, inter, cfg
        self.gate_up_proj: StackedQuant | None = None
        self.down_proj: StackedQuant | None = None
        self.on_use = None                                   # residency.py: told which experts ran
        self.offloaded = False                               # in CPU memory for a model elsewhere (offload_experts)

    def load(self, name: str, t: dict[str, torch.Tensor]) -> None:
        setattr(self, name, StackedQuant({k: v.contiguous() for k, v in t.items()}))

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        return getattr(self, name).tensors
