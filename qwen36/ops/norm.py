"""RMS norms of qwen3_5_moe: both normalise in fp32 and return the input dtype.

  rms_norm(x, w, eps)             zero-centred: the stored weight w is applied as (1 + w)
  gated_rms_norm(x, z, w, eps)    DeltaNet's output norm: plain w, then a SiLU(z) gate ("norm before gate")

The dispatchers use the native kernels (one call instead of eight tensor ops; csrc/qkernels.cpp rms_norm,
gated_rms_norm) for a decode-sized step (up to PREFILL_ROWS tokens) in fp32 on the CPU. Large steps keep the
tensor ops, whose rounding transformers' shares (a last-bit difference can flip a near-tied expert choice of
a random router and move a prefill's logits by ~1e-4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import PREFILL_ROWS, Backend


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm_reference(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, heads, D], z of x's shape."""
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return ((weight * n) * F.silu(z.float())).to(x.dtype)


def _native_for(x: torch.Tensor, backend: Backend):
    """The native kernels for a decode-sized fp32 CPU step, else None (see the module text)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() > PREFILL_ROWS * x.shape[-1] * (
            1 if x.dim() == 2 else x.shape[-2]):
        return None
    return backend.native


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: Backend) -> torch.Tensor:
    ext = _native_for(x, backend)
    if ext is not None:
        return ext.rms_norm(x.reshape(-1, x.shape[-1]), weight.float(), eps).view(x.shape)
    return rms_norm_reference(x, weight, eps)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   backend: Backend) -> torch.Tensor:
    """x [N, heads, D], z [N, heads, D] (or [N, heads * D])."""
    ext = _native_for(x, backend)
    if ext is not None and z.dtype == torch.float32:
        return ext.gated_rms_norm(x, z, weight.float(), eps).view(x.shape)
    return gated_rms_norm_reference(x, z.view(x.shape), weight, eps)
