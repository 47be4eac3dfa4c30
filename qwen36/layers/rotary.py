"""Partial, interleaved multimodal RoPE (mRoPE) of the text model.

Only the first `rotary_dim` (64 of 256) dims of each head rotate, in the half-split (NeoX) layout: dim d
pairs with d + rotary_dim/2. Frequency j takes its angle from the H axis if j % 3 == 1 and j < 3*sec_h,
from the W axis if j % 3 == 2 and j < 3*sec_w, else from the T axis. For text T = H = W = position.
"""
from __future__ import annotations

import torch

from ..config import TextConfig


class MRotary:
    def __init__(self, cfg: TextConfig, device):
        rd = cfg.rotary_dim
        self.rotary_dim = rd
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float) / rd)).to(device)
        j = torch.arange(rd // 2)
        _, sec_h, sec_w = cfg.mrope_section
        axis = torch.zeros(rd // 2, dtype=torch.long)                          # 0 = T, 1 = H, 2 = W
        axis[(j % 3 == 1) & (j < 3 * sec_h)] = 1
        axis[(j % 3 == 2) & (j < 3 * sec_w)] = 2
        self.axis = axis.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [3, N] (T, H, W) -> cos, sin [N, rotary_dim] in `dtype` (angles computed in fp32)."""
        pos = positions.to(self.inv_freq.device).float()[self.axis]            # [rd/2, N]: each freq's axis
        freqs = pos.t() * self.inv_freq                                        # [N, rd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; rotates x[..., :rd] with cos/sin [N, rd]; the rest passes through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    a, b = rot[..., : rd // 2], rot[..., rd // 2:]
    rotated = torch.cat([-b, a], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)
