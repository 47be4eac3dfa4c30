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


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """[linear(x) for linear in linears], in one native call when they allow it (kernels.multi_linear:
    int4 QuantLinears and fp32 Linears without bias, a decode-sized x [N, K]); the same values either way."""
    from ..kernels import multi_linear
    weights = [getattr(m, "packed", None) if hasattr(m, "packed") else m.weight for m in linears]
    if all(getattr(m, "bias", None) is None for m in linears) and all(w is not None for w in weights):
        outs = multi_linear(x, weights)
        if outs is not None:
            return outs
    return [m(x) for m in linears]
