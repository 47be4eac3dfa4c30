"""Causal grouped-query attention of one sequence against its cached keys.

  q [Hq, T, D]; k, v [Hkv, S, D] with S = offset + T (the cache up to and including the new tokens).
Query t (absolute position offset + t) sees keys 0..offset+t. Returns [Hq, T, D].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_reference(q, k, v, scale: float):
    Hq, T, _ = q.shape
    Hkv, S, _ = k.shape
    k, v = k.repeat_interleave(Hq // Hkv, dim=0), v.repeat_interleave(Hq // Hkv, dim=0)
    scores = (q @ k.transpose(-1, -2)).float() * scale                       # [Hq, T, S]
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v)


def attention(q, k, v, scale: float):
    T, S = q.shape[1], k.shape[1]
    if T == 1:
        mask, causal = None, False
    elif T == S:
        mask, causal = None, True
    else:
        mask, causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T), False
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=causal,
                                          scale=scale, enable_gqa=True)[0]
