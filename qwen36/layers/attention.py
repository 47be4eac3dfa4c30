"""Gated full attention: per-head [query | gate] from q_proj, (1+w) q/k norms, partial mRoPE, GQA,
sigmoid output gate, o_proj."""
from __future__ import annotations

import torch
from torch import nn

from ..batch import SHORT, ForwardBatch
from ..config import TextConfig
from ..ops.attention import attention
from .linear import Linear, project
from .norm import RMSNorm
from .rotary import apply_rotary


class GatedAttention(nn.Module):
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
        q, gate = q.view(N, self.n_q, 2 * self.d).chunk(2, dim=-1)              # [N, Hq, D] each
        q = apply_rotary(self.q_norm(q), *rope)
        k = apply_rotary(self.k_norm(k.view(N, self.n_kv, self.d)), *rope)
        v = v.view(N, self.n_kv, self.d)
        kc, vc = cache["k"], cache["v"]                                        # [rows, Hkv, D]
        out = torch.empty_like(q)
        for i, rows in enumerate(batch.kv_rows):
            a, b = batch.cu[i], batch.cu[i + 1]
            kc[rows[-(b - a):]] = k[a:b]
            vc[rows[-(b - a):]] = v[a:b]
            K, V = kc[rows].transpose(0, 1), vc[rows].transpose(0, 1)
            if 1 < b - a <= SHORT:   # one query at a time, as decoding runs it (the same arithmetic)
                S = K.shape[1] - (b - a)
                for j in range(b - a):
                    o = attention(q[a + j:a + j + 1].transpose(0, 1), K[:, :S + j + 1], V[:, :S + j + 1], self.scale)
                    out[a + j] = o[:, 0]
                continue
            o = attention(q[a:b].transpose(0, 1), K, V, self.scale)
            out[a:b] = o.transpose(0, 1)
        out = out.reshape(N, -1) * torch.sigmoid(gate.reshape(N, -1))
        return self.o_proj(out)
