"""Partial, interleaved multimodal RoPE (mRoPE) of the text model, with optional YaRN.

Only the first `rotary_dim` (64 of 256) dims of each head rotate, in the half-split (NeoX) layout: dim d
pairs with d + rotary_dim/2. Frequency j takes its angle from the H axis if j % 3 == 1 and j < 3*sec_h,
from the W axis if j % 3 == 2 and j < 3*sec_w, else from the T axis. For text T = H = W = position.

This is the one place the angles are made. Frequencies, angles, cos and sin are computed in fp32 with the
same operations, in the same order, as transformers (`_compute_default_rope_parameters`,
`_compute_yarn_parameters`, `Qwen3_5MoeTextRotaryEmbedding.forward`), so the tables are bit-equal to the
reference at every position, 1,000,000 included (an fp32 angle of a large position is only as exact as that
arithmetic; a different order of the same math drifts by whole radians' fractions there).
YaRN rescales the 32 frequencies before the M-RoPE axis selection and multiplies cos and sin by its
attention factor (0.1 ln(factor) + 1 unless the config states one).
"""
from __future__ import annotations

import math

import torch

from ..config import TextConfig


def rope_frequencies(cfg: TextConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 [rotary_dim / 2], attention_scaling) for `cfg`'s rope parameters."""
    base, dim = cfg.rope_theta, cfg.rotary_dim
    s = cfg.rope_scaling
    if s is None:
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    factor = cfg.rope_factor

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations):   # the dimension whose wavelength makes `rotations` turns in the original length
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                                          # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp                   # 1: the frequency as trained (fast ones); 0: divided by factor (slow ones)
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


class MRotary:
    def __init__(self, cfg: TextConfig, device):
        rd = cfg.rotary_dim
        self.rotary_dim = rd
        inv_freq, self.attention_scaling = rope_frequencies(cfg)
        self.inv_freq = inv_freq.to(device)
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
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; rotates x[..., :rd] with cos/sin [N, rd]; the rest passes through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    a, b = rot[..., : rd // 2], rot[..., rd // 2:]
    rotated = torch.cat([-b, a], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)
