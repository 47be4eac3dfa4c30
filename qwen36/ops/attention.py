"""Causal grouped-query attention of one sequence against its cached keys, and the KV cache's storage.

  q [Hq, T, D]; k, v [Hkv, S, D] with S = offset + T (the cache up to and including the new tokens).
Query t (absolute position offset + t) sees keys 0..offset+t. Returns [Hq, T, D].
KV storage (cache.kv_storage): rows of an attention layer's cache dict ("k", "v" [rows, Hkv, D]) are in the
compute dtype, fp32, bf16 or int8; int8 rows carry per-token, per-head scales ("k_scale", "v_scale" [rows,
Hkv] fp32: symmetric, scale = absmax / 127, code = round-to-nearest-even(x / scale)). `kv_write` stores rows,
`kv_read` gives them back as floats: the only places that know the storage (the native kernel reads all three
in registers).
`prefill_attention`: a chunk's queries against the sequence's cached rows, tiled over key blocks (one block
gathered and dequantized at a time, merged by log-sum-exp): transient memory bounded by the block size.
`decode_attention`: one query for each of B sequences against their cached rows, all in one call.
`gated_attention_short`: the native call for chunks of at most SHORT tokens (decode, speculative
verification) of the gated attention layer, from the projections to the gated output (its reference is the
layer's tensor path, layers/attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import Backend

PREFILL_BLOCK = 8192                 # key rows per tile of prefill_attention
NO_SCALES = torch.empty(0)           # the native call's scales where rows are not int8
_TINY = torch.finfo(torch.float32).tiny


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


# ---------------------------------------------------------------- KV storage
def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> int8 codes [..., D] and fp32 scales [...]: symmetric absmax / 127 per row, round to
    nearest (even); x ~= codes * scale, |error| <= scale / 2."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    return (x / scale.clamp_min(_TINY)[..., None]).round().to(torch.int8), scale


def kv_write(cache: dict[str, torch.Tensor], rows, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v [n, Hkv, D] into cache rows `rows` [n] in the cache's storage (int8: with their scales)."""
    for name, x in (("k", k), ("v", v)):
        t = cache[name]
        if t.dtype == torch.int8:
            t[rows], cache[name + "_scale"][rows] = quantize_kv(x)
        else:
            t[rows] = x.to(t.dtype)


def kv_rows(t: torch.Tensor, scale: torch.Tensor | None, index, dtype: torch.dtype) -> torch.Tensor:
    """Rows `index` (any shape) of one cache tensor as `dtype` floats: [*index.shape, Hkv, D]."""
    x = t[index]
    if t.dtype == torch.int8:
        return (x.float() * scale[index][..., None]).to(dtype)
    return x.to(dtype)


def kv_read(cache: dict[str, torch.Tensor], index, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of cache rows `index` as `dtype` floats, each [*index.shape, Hkv, D]."""
    return (kv_rows(cache["k"], cache.get("k_scale"), index, dtype),
            kv_rows(cache["v"], cache.get("v_scale"), index, dtype))


def kv_scales(cache: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 rows' scales as the native call takes them (empty where the rows are floats)."""
    return cache.get("k_scale", NO_SCALES), cache.get("v_scale", NO_SCALES)


# ---------------------------------------------------------------- prefill
def prefill_attention(q: torch.Tensor, cache: dict[str, torch.Tensor], rows: torch.Tensor, scale: float,
                      block: int | None = None) -> torch.Tensor:
    """q [Hq, T, D], the last T of a sequence's S cache rows `rows` [S] (written already) -> [Hq, T, D]:
    query t sees rows 0..S-T+t. Up to `block` rows: one `attention` call over them. Longer: key blocks of
    `block` rows one at a time (gathered, dequantized), each query's output and log-sum-exp per block, merged
    (online softmax, in fp32); the causal mask only where a block passes the first query's position.
    block None: PREFILL_BLOCK."""
    S, T, block = len(rows), q.shape[1], block or PREFILL_BLOCK
    if S <= block:
        K, V = kv_read(cache, rows, q.dtype)
        return attention(q, K.transpose(0, 1), V.transpose(0, 1), scale)
    Hq, _, D = q.shape
    P = S - T                                        # query t sees keys 0..P+t
    out = torch.zeros(Hq, T, D, dtype=torch.float32, device=q.device)
    lse = torch.full((Hq, T), float("-inf"), dtype=torch.float32, device=q.device)
    for lo in range(0, S, block):
        hi = min(S, lo + block)
        t0 = max(0, lo - P)                          # queries before t0 see none of this block
        K, V = kv_read(cache, rows[lo:hi], q.dtype)
        o, l = _block_attention(q[:, t0:], K.transpose(0, 1), V.transpose(0, 1), P + t0 - lo, scale)
        new = torch.logaddexp(lse[:, t0:], l)
        out[:, t0:] = out[:, t0:] * torch.exp(lse[:, t0:] - new)[..., None] + o.float() * torch.exp(l - new)[..., None]
        lse[:, t0:] = new
    return out.to(q.dtype)


def _block_attention(q, k, v, last: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Hq, t, D] against one key block k, v [Hkv, n, D]; query j sees the block's keys 0..last+j (last >= 0).
    Returns the output [Hq, t, D] and the log-sum-exp of the scaled scores [Hq, t] (fp32)."""
    Hq, t, D = q.shape
    Hkv, n, _ = k.shape
    rep = Hq // Hkv
    qg = q.reshape(Hkv, rep * t, D)                  # each KV head's rep query heads as rows (no repeated K/V)
    mask = None
    if last < n - 1:                                 # the block passes the first query's last key
        allowed = torch.arange(n, device=q.device)[None, :] <= (last + torch.arange(t, device=q.device))[:, None]
        mask = torch.zeros(t, n, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf")).repeat(rep, 1)
    if q.device.type == "cpu":
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg[None], k[None], v[None], 0.0, False,
                                                                           attn_mask=mask, scale=scale)
        o, l = o[0], l[0]
    else:
        s = (qg @ k.transpose(-1, -2)).float() * scale
        if mask is not None:
            s = s + mask.float()
        l = torch.logsumexp(s, -1)
        o = torch.exp(s - l[..., None]).to(v.dtype) @ v
    return o.reshape(Hq, t, D), l.reshape(Hq, t)


# ---------------------------------------------------------------- decode
def decode_attention(q, k_cache, v_cache, table, lens, scale: float, k_scale=None, v_scale=None):
    """q [B, Hq, D], one new token per sequence (its K/V already written); k_cache, v_cache [rows, Hkv, D]
    (int8: with k_scale, v_scale [rows, Hkv]); table [B, L] int64: sequence b's cache rows of positions
    0..L-1, entries at or past lens[b] [B] ignored (any valid row). Returns [B, Hq, D]. Fixed shapes for a
    fixed (B, L), no host read: CUDA graphs capture it."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    # plain matmuls, each KV head serving its Hq/Hkv query heads (no repeated K/V; SDPA would take its math
    # path for a mask with GQA, which materialises them)
    k = kv_rows(k_cache, k_scale, table, q.dtype).permute(0, 2, 3, 1)             # [B, Hkv, D, L]
    v = kv_rows(v_cache, v_scale, table, q.dtype).transpose(1, 2)                 # [B, Hkv, L, D]
    scores = (q.view(B, Hkv, Hq // Hkv, D) @ k).float() * scale                    # [B, Hkv, rep, L]
    seen = torch.arange(table.shape[1], device=table.device)[None, :] < lens[:, None]  # [B, L]
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, Hq, D)


# ---------------------------------------------------------------- native short chunks
NATIVE_KV = (torch.float32, torch.bfloat16, torch.int8)


def short_native(x: torch.Tensor, k_cache: torch.Tensor, backend: Backend):
    """The native kernels where `gated_attention_short` takes this step (fp32 activations on the CPU; KV rows
    fp32, bf16 or int8), else None."""
    if x.dtype == torch.float32 and k_cache.dtype in NATIVE_KV and x.device.type == "cpu":
        return backend.native
    return None


def gated_attention_short(q, k, v, q_norm, k_norm, eps: float, cos, sin, cache: dict[str, torch.Tensor], rows,
                          rows_cu, tokens_cu, scale: float, backend: Backend) -> torch.Tensor:
    """Chunks of at most SHORT tokens in one native call (csrc/qkernels.cpp gated_attention_short; check
    `short_native` first): (1 + w) q/k norms, rotary, the cache writes (in the cache's storage), each query
    alone against its prefix (as decoding runs it; key blocks of a fixed size merged in a fixed order), the
    sigmoid gate. q [n, Hq, 2D] ([query | gate] per head), k, v [n, Hkv, D]; q_norm, k_norm fp32 [D]; cos, sin
    [n, D/2...] as the rotary gives them; cache: the layer's rows; rows, rows_cu, tokens_cu: the sequences'
    cache rows and offsets (ForwardBatch.kv_rows_flat). Returns [n, Hq * D]."""
    return backend.native.gated_attention_short(q, k, v, q_norm, k_norm, eps, cos, sin, cache["k"], cache["v"],
                                                *kv_scales(cache), rows, rows_cu, tokens_cu, scale)
