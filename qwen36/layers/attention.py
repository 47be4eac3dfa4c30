"""Gated full attention: per-head [query | gate] from q_proj, (1+w) q/k norms, partial mRoPE, GQA,
sigmoid output gate, o_proj."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..batch import SHORT, ForwardBatch
from ..config import TextConfig
from ..ops.attention import (decode_attention, gated_attention_short, kv_scales, kv_write, prefill_attention,
                             short_native)
from ..ops.backend import UsesBackend
from .linear import Linear, int4_parts, project
from .norm import RMSNorm
from .rotary import apply_rotary


class GatedAttention(UsesBackend, nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_q, self.n_kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(H, self.n_q * self.d * 2, bias)                   # per head: [query D | gate D]
        self.k_proj = Linear(H, self.n_kv * self.d, bias)
        self.v_proj = Linear(H, self.n_kv * self.d, bias)
        self.o_proj = Linear(self.n_q * self.d, H, bias)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.scale = self.d ** -0.5

    def forward(self, x: torch.Tensor, rope, batch: ForwardBatch, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        native = short_native(x, cache["k"], self.backend)
        short = [i for i, n in enumerate(batch.lens) if n <= SHORT] if native is not None else []
        if len(short) == len(batch.lens):      # decode or verification only: every query in the native call
            return self.o_proj(self._short(q, k, v, rope, batch, cache, short, None))
        if native is None and batch.is_decode:     # (no native kernels: GPU) every sequence in one call
            return self.o_proj(self._decode(q, k, v, rope, batch, cache))
        out = torch.empty(N, self.n_q * self.d, dtype=x.dtype, device=x.device)
        if short:
            idx = torch.cat([torch.arange(batch.cu[i], batch.cu[i + 1]) for i in short])
            out[idx] = self._short(q, k, v, rope, batch, cache, short, idx)
        long = [i for i in range(len(batch.lens)) if i not in short]
        idx = torch.cat([torch.arange(batch.cu[i], batch.cu[i + 1]) for i in long]) if short else None
        sub = (lambda t: t if idx is None else t[idx])
        n = N if idx is None else len(idx)
        qg, kl, vl = sub(q).view(n, self.n_q, 2 * self.d), sub(k).view(n, self.n_kv, self.d), sub(v)
        ql, gate = qg.chunk(2, dim=-1)                                         # [n, Hq, D] each
        cos, sin = sub(rope[0]), sub(rope[1])
        ql = apply_rotary(self.q_norm(ql), cos, sin)
        kl = apply_rotary(self.k_norm(kl), cos, sin)
        vl = vl.view(n, self.n_kv, self.d)
        o_long = torch.empty_like(ql)
        at = 0
        for i in long:
            rows, T = batch.kv_rows[i], batch.lens[i]
            kv_write(cache, rows[-T:], kl[at:at + T], vl[at:at + T])
            qi = ql[at:at + T].transpose(0, 1)                                 # [Hq, T, D]
            if 1 < T <= SHORT:   # (no native kernels) one query at a time, as decoding runs it
                S = len(rows) - T
                for j in range(T):
                    o_long[at + j] = prefill_attention(qi[:, j:j + 1], cache, rows[:S + j + 1], self.scale)[:, 0]
            else:
                o_long[at:at + T] = prefill_attention(qi, cache, rows, self.scale).transpose(0, 1)
            at += T
        gated = o_long.reshape(n, -1) * torch.sigmoid(gate.reshape(n, -1))
        if idx is None:
            out = gated
        else:
            out[idx] = gated
        return self.o_proj(out)

    def _decode(self, q, k, v, rope, batch: ForwardBatch, cache) -> torch.Tensor:
        """A decode step (one token per sequence) without per-sequence work: norms, rotary, the cache writes
        (each sequence's last row of batch.kv_table) and attention over the padded tables. Returns [B, Hq * D]."""
        B = q.shape[0]
        ql, gate = q.view(B, self.n_q, 2 * self.d).chunk(2, dim=-1)
        ql = apply_rotary(self.q_norm(ql), *rope)
        kl = apply_rotary(self.k_norm(k.view(B, self.n_kv, self.d)), *rope)
        table, lens = batch.kv_table, batch.kv_lens
        last = table.gather(1, (lens - 1)[:, None])[:, 0]
        kv_write(cache, last, kl, v.view(B, self.n_kv, self.d))
        o = decode_attention(ql, cache["k"], cache["v"], table, lens, self.scale, *kv_scales(cache))
        return o.reshape(B, -1) * torch.sigmoid(gate.reshape(B, -1))

    def _short(self, q, k, v, rope, batch: ForwardBatch, cache, members: list[int], idx) -> torch.Tensor:
        """Sequences `members` (chunks of at most SHORT tokens: decode, speculative verification) through
        `gated_attention_short`: q/k norms, rotary, cache writes, each query alone against its prefix, gate.
        idx: their rows of the step (None: all). Returns [rows, Hq * D]."""
        sub = (lambda t: t if idx is None else t[idx].contiguous())
        n = q.shape[0] if idx is None else len(idx)
        rows, rcu, tcu = batch.kv_rows_flat if idx is None else batch.kv_rows_of(members)
        return gated_attention_short(sub(q).view(n, self.n_q, 2 * self.d), sub(k).view(n, self.n_kv, self.d),
                                     sub(v).view(n, self.n_kv, self.d), *self.norm_weights(), self.q_norm.eps,
                                     sub(rope[0]).contiguous(), sub(rope[1]).contiguous(), cache, rows, rcu, tcu,
                                     self.scale, self.backend)

    def norm_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The q and k norms' weights as the native calls take them (fp32, contiguous)."""
        return self.q_norm.weight.float().contiguous(), self.k_norm.weight.float().contiguous()

    def decode_args(self) -> "AttentionDecodeArgs | None":
        """What a decode plan (layers/decode_plan.py) runs this layer with; None where a projection is not
        int4 for the fused kernels or their group sizes differ."""
        projections = [int4_parts(m) for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj)]
        if any(p is None for p in projections) or len({g for _, g in projections}) != 1:
            return None
        qw, kw = self.norm_weights()
        parts = [p for p, _ in projections]
        return AttentionDecodeArgs(parts[:3], parts[3], projections[0][1], qw, kw, self.q_norm.eps,
                                   (self.n_q, self.n_kv, self.d, self.scale),
                                   [t for p in parts for t in p] + [self.q_norm.weight, self.k_norm.weight])


class AttentionDecodeArgs(NamedTuple):
    qkv: list                  # q, k, v projections' int4 parts (multi_linear)
    out: list                  # o_proj's int4 parts (q4q8_gemv)
    group: int
    q_norm: torch.Tensor       # fp32 norm weights and eps (gated_attention_short)
    k_norm: torch.Tensor
    eps: float
    dims: tuple                # (n_q, n_kv, d, scale)
    watched: list              # the tensors read: one replaced -> the plan is rebuilt
