"""A linear layer whose stored weight may be in a lower precision than the activations.

On CPU weights are stored in the checkpoint dtype (bf16) or fp32 and activations are always fp32: bf16
matmul on CPU is ~500x slower than fp32, so the weight is cast on use.
"""
from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import float_linear
        return float_linear(x, self.weight, self.bias)
