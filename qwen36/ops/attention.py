"""Causal grouped-query attention of one sequence against its cached keys.

  q [Hq, T, D]; k, v [Hkv, S, D] with S = offset + T (the cache up to and including the new tokens).
Query t (absolute position offset + t) sees keys 0..offset+t. Returns [Hq, T, D].
`decode_attention`: one query for each of B sequences against their cached rows, all in one call.
`gated_attention_short`: the native call for chunks of at most SHORT tokens (decode, speculative
verification) of the gated attention layer, from the projections to the gated output (its reference is the
layer's tensor path, layers/attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import Backend


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


def decode_attention(q, k_cache, v_cache, table, lens, scale: float):
    """q [B, Hq, D], one new token per sequence (its K/V already written); k_cache, v_cache [rows, Hkv, D];
    table [B, L] int64: sequence b's cache rows of positions 0..L-1, entries at or past lens[b] [B] ignored
    (any valid row). Returns [B, Hq, D]. Fixed shapes for a fixed (B, L), no host read: CUDA graphs capture it."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    # plain matmuls, each KV head serving its Hq/Hkv query heads (no repeated K/V; SDPA would take its math
    # path for a mask with GQA, which materialises them)
    k, v = k_cache[table].permute(0, 2, 3, 1), v_cache[table].transpose(1, 2)       # [B, Hkv, D, L], [B, Hkv, L, D]
    scores = (q.view(B, Hkv, Hq // Hkv, D) @ k).float() * scale                    # [B, Hkv, rep, L]
    seen = torch.arange(table.shape[1], device=table.device)[None, :] < lens[:, None]  # [B, L]
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, Hq, D)


def short_native(x: torch.Tensor, k_cache: torch.Tensor, backend: Backend):
    """The native kernels where `gated_attention_short` takes this step (fp32 on the CPU), else None."""
    if x.dtype == k_cache.dtype == torch.float32 and x.device.type == "cpu":
        return backend.native
    return None


def gated_attention_short(q, k, v, q_norm, k_norm, eps: float, cos, sin, k_cache, v_cache, rows, rows_cu, tokens_cu,
                          scale: float, backend: Backend) -> torch.Tensor:
    """Chunks of at most SHORT tokens in one native call (csrc/qkernels.cpp gated_attention_short; check
    `short_native` first): (1 + w) q/k norms, rotary, the cache writes, each query alone against its prefix
    (as decoding runs it), the sigmoid gate. q [n, Hq, 2D] ([query | gate] per head), k, v [n, Hkv, D];
    q_norm, k_norm fp32 [D]; cos, sin [n, D/2...] as the rotary gives them; rows, rows_cu, tokens_cu: the
    sequences' cache rows and offsets (ForwardBatch.kv_rows_flat). Returns [n, Hq * D]."""
    return backend.native.gated_attention_short(q, k, v, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, rows,
                                                rows_cu, tokens_cu, scale)
