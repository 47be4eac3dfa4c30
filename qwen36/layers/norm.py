"""RMS norms of qwen3_5_moe. Both normalise in fp32 and return the input dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: the stored weight w is applied as (1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = _fused(x)
        if ext is not None:      # one call instead of eight tensor ops (csrc/qkernels.cpp rms_norm)
            return ext.rms_norm(x.reshape(-1, x.shape[-1]), self.weight.float(), self.eps).view(x.shape)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """DeltaNet output norm: plain weight w (not 1 + w), then a SiLU(z) gate ("norm before gate")."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x [N, heads, D], z [N, heads, D] (or [N, heads * D])."""
        ext = _fused(x)
        if ext is not None and z.dtype == torch.float32:
            return ext.gated_rms_norm(x, z, self.weight.float(), self.eps).view(x.shape)
        return self.reference(x, z.view(x.shape))

    def reference(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return ((self.weight * n) * F.silu(z.float())).to(x.dtype)


def _fused(x: torch.Tensor):
    """The native kernels for a decode-sized step (up to PREFILL_ROWS tokens) in fp32 on the CPU, else None:
    large steps keep the tensor ops, whose rounding transformers' shares (a last-bit difference can flip a
    near-tied expert choice of a random router and move a prefill's logits by ~1e-4)."""
    from ..kernels import PREFILL_ROWS, native
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() > PREFILL_ROWS * x.shape[-1] * (
            1 if x.dim() == 2 else x.shape[-2]):
        return None
    return native()
