"""A linear layer whose stored weight may be in a lower precision than the activations.

On CPU weights are stored in the checkpoint dtype (bf16) or fp32 and activations are always fp32: bf16
matmul on CPU is ~500x slower than fp32, so the weight is cast on use. Quantized weights: layers/quant.py.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.backend import UsesBackend
from ..ops.linear import float_linear, fused_ok, kernel_args, multi_linear
from ..ops.qformat import group_of


class Linear(UsesBackend, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def kernel_weight(self) -> torch.Tensor:
        """The weight as the ops take it (a float tensor; QuantLinear's is its quantized parts)."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float_linear(x, self.weight, self.backend, self.bias)


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """[linear(x) for linear in linears], in one native call when they allow it (ops.linear.multi_linear:
    int4 QuantLinears and fp32 Linears without bias, a decode-sized x [N, K]); the same values either way."""
    if all(m.bias is None for m in linears):
        outs = multi_linear(x, [m.kernel_weight for m in linears], linears[0].backend)
        if outs is not None:
            return outs
    return [m(x) for m in linears]


def int4_parts(m: nn.Module):
    """(parts, group size) of a bias-free quantized linear as the fused int8-activation kernels take it;
    None for any other linear (float, int8, groups the kernels do not take, no int8 activations)."""
    w = m.kernel_weight
    if not isinstance(w, dict) or m.bias is not None or not fused_ok([w], m.backend):
        return None
    return kernel_args(w), group_of(w)


def f32_weight(m: nn.Module) -> torch.Tensor | None:
    """A bias-free linear's fp32 contiguous weight (what the fused calls take beside int4 ones), else None."""
    w = m.kernel_weight
    ok = isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.is_contiguous() and m.bias is None
    return w if ok else None
