"""Matmul kernels for quantized weights: `pack` a quantized tensor once, `qlinear(x, packed)` per call.

The reference path dequantizes and calls F.linear (exact by construction, slow); it is what every faster
path is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pack(t: dict[str, torch.Tensor]):
    return {k: v.contiguous() for k, v in t.items()}


def unpack(packed) -> dict[str, torch.Tensor]:
    return packed


def qlinear_reference(x: torch.Tensor, packed) -> torch.Tensor:
    from .quant import dequantize

    return F.linear(x, dequantize(packed).to(x.dtype))


qlinear = qlinear_reference
