"""RMS norms of qwen3_5_moe (ops/norm.py). Both normalise in fp32 and return the input dtype."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.backend import UsesBackend
from ..ops.norm import gated_rms_norm, gated_rms_norm_reference, rms_norm, rms_norm_reference


class RMSNorm(UsesBackend, nn.Module):
    """Zero-centred RMSNorm: the stored weight w is applied as (1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


class GatedRMSNorm(UsesBackend, nn.Module):
    """DeltaNet output norm: plain weight w (not 1 + w), then a SiLU(z) gate ("norm before gate")."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x [N, heads, D], z [N, heads, D] (or [N, heads * D])."""
        return gated_rms_norm(x, z, self.weight, self.eps, self.backend)

    def reference(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm_reference(x, z, self.weight, self.eps)
