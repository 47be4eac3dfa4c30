"""Gated DeltaNet (linear attention with a fixed-size recurrent state per sequence).

in_proj_qkv -> depthwise causal conv (W taps) + SiLU -> q, k [Hk, Dk], v [Hv, Dv]; value head i reads
q/k head i // (Hv/Hk). q, k L2-normalised (fp32), q scaled by Dk^-0.5; beta = sigmoid(b);
g = -exp(A_log) * softplus(a + dt_bias). Gated delta rule (chunked for prefill, recurrent for decode),
gated RMSNorm with z, out_proj.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import SHORT, ForwardBatch
from ..config import TextConfig
from ..ops.backend import UsesBackend
from ..ops.conv1d import causal_conv1d
from ..ops.gated_delta import (DECODE_ROWS, delta_decode, delta_prep, gated_delta, gated_delta_steps,
                               native_for)
from .linear import Linear, f32_weight, int4_parts, project
from .norm import GatedRMSNorm


class Conv1dWeight(nn.Module):
    """Holds `conv1d.weight` [C, 1, W] under the checkpoint's name."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width), requires_grad=False)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(UsesBackend, nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        H = cfg.hidden_size
        self.n_k, self.d_k = cfg.linear_num_key_heads, cfg.linear_key_head_dim
        self.n_v, self.d_v = cfg.linear_num_value_heads, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = cfg.linear_key_dim, cfg.linear_value_dim
        self.in_proj_qkv = Linear(H, cfg.linear_conv_dim)
        self.in_proj_z = Linear(H, self.value_dim)
        self.in_proj_b = Linear(H, self.n_v)
        self.in_proj_a = Linear(H, self.n_v)
        self.conv1d = Conv1dWeight(cfg.linear_conv_dim, cfg.linear_conv_kernel_dim)
        self.dt_bias = nn.Parameter(torch.empty(self.n_v), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.n_v), requires_grad=False)
        self.norm = GatedRMSNorm(self.d_v, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, H)
        self._consts = None                      # small_weights(): (key, fp32 copies)

    def _qkv(self, y: torch.Tensor):
        """y [B, T, C] conv output -> q, k [B, T, Hk, Dk] fp32 (normalised, q scaled), v [B, T, Hv, Dv] fp32."""
        B, T, _ = y.shape
        q, k, v = y.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2norm(q.reshape(B, T, self.n_k, self.d_k).float()) * self.d_k ** -0.5
        k = l2norm(k.reshape(B, T, self.n_k, self.d_k).float())
        return q, k, v.reshape(B, T, self.n_v, self.d_v).float()

    def _mix(self, m: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, conv: torch.Tensor, state: torch.Tensor,
             decode: bool):
        """m [B, T, C] pre-conv; g, beta [B, T, Hv]; conv [B, W-1, C]; state [B, Hv, Dk, Dv].
        Returns o [B, T, Hv, Dv], new conv, new state."""
        B, T, _ = m.shape
        # the conv sums in fp32 (in bf16 each of its W multiply-adds would round; the reference's F.conv1d
        # accumulates in fp32); its state keeps the inputs as they were (exact in the compute dtype)
        y, conv = causal_conv1d(m.float(), self.conv1d.weight[:, 0].float(), conv)
        q, k, v = self._qkv(F.silu(y))
        rep = self.n_v // self.n_k
        q, k = (t.repeat_interleave(rep, dim=2) for t in (q, k))
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))           # [B, Hv, T, D]
        o, state = gated_delta(q, k, v, g.transpose(1, 2), beta.transpose(1, 2), state, self.backend, decode=decode,
                               low_precision=m.dtype != torch.float32)
        return o.transpose(1, 2), conv, state

    def _steps(self, m, a, b, cache: dict[str, torch.Tensor], batch: ForwardBatch, members: list[int], T: int,
               o: torch.Tensor) -> None:
        """Sequences `members` of the batch, T new tokens each, through conv and recurrence token by token
        (decode's arithmetic, so a verified draft leaves exactly the states decoding would). With
        batch.keep, the states after each of a sequence's first keep[i] tokens go to its "spec_*" rows.
        Native: conv, SiLU, norms and gates in one call (delta_prep), then the recurrence (delta_steps)."""
        dev = m.device
        B = len(members)
        slots = batch.slot_tensor if B == len(batch.slots) else torch.tensor([batch.slots[i] for i in members],
                                                                             device=dev)
        if B == len(batch.slots) and T == 1:
            rows = None                                       # a decode step: every row, in order
            mi, ai, bi = m.view(B, 1, -1), a.view(B, 1, -1), b.view(B, 1, -1)
        else:
            rows = torch.cat([torch.arange(batch.cu[i], batch.cu[i] + T, device=dev) for i in members])
            mi, ai, bi = m[rows].view(B, T, -1), a[rows].view(B, T, -1), b[rows].view(B, T, -1)
        conv_c, state_c = cache["conv"], cache["state"]
        nkeep = [batch.keep[i] if batch.keep else 0 for i in members]
        nk = torch.tensor(nkeep, dtype=torch.long)
        weight = self.conv1d.weight[:, 0].to(m.dtype)
        if native_for(m, conv_c, self.backend) is not None:
            keep_conv = cache["spec_conv"] if any(nkeep) else torch.empty(0)
            q, k, v, g, beta = delta_prep(mi, ai, bi, conv_c, weight, slots, self.A_log, self.dt_bias, keep_conv, nk,
                                          (self.n_k, self.d_k, self.d_v), self.backend)
        else:
            g, beta = self._gates(ai, bi)
            prev = conv_c[slots]
            y, conv = causal_conv1d(mi.float(), weight.float(), prev, per_token=True)      # fp32 sums, as above
            if any(nkeep):      # conv state after token t: the last W-1 inputs up to it
                xs, W1 = torch.cat([prev.to(mi.dtype), mi], dim=1), prev.shape[1]
                for j, i in enumerate(members):
                    for t in range(nkeep[j]):
                        cache["spec_conv"][batch.slots[i], t] = xs[j, t + 1:t + 1 + W1]
            conv_c[slots] = conv.to(conv_c.dtype)
            q, k, v = self._qkv(F.silu(y))
        keep = cache.get("spec_state") if any(nkeep) else None
        out = gated_delta_steps(state_c, slots, q, k, v, g, beta, self.backend, keep, nk).reshape(B * T, self.n_v,
                                                                                                   self.d_v)
        if rows is None:
            o.copy_(out)
        else:
            o[rows] = out

    def small_weights(self) -> tuple[torch.Tensor, ...]:
        """(conv1d [C, W], A_log, dt_bias, norm weight) as the native decode calls take them: fp32 contiguous
        copies, made once per set of weights."""
        small = (self.conv1d.weight, self.A_log, self.dt_bias, self.norm.weight)
        key = tuple(t.data_ptr() for t in small)
        if self._consts is None or self._consts[0] != key:
            self._consts = key, (small[0][:, 0].float().contiguous(), *(t.float().contiguous() for t in small[1:]))
        return self._consts[1]

    def capture_decode(self, cache: dict[str, torch.Tensor], batch: ForwardBatch) -> None:
        """After a decode step: the states the prefix cache asked for (batch.captures) into their snapshots."""
        for slot, caps in zip(batch.slots, batch.captures):
            for _, snap in caps:
                self._capture(cache, snap, cache["conv"][slot], cache["state"][slot])

    def _decode(self, m, a, b, z, cache: dict[str, torch.Tensor], batch: ForwardBatch) -> torch.Tensor | None:
        """A decode step (one token per sequence) from the projections to the output norm in one native call
        (delta_decode: delta_prep, delta_steps, gated_rms_norm; what `_steps` and `norm` compute). Returns
        [B, value_dim], or None where the call does not apply (then the general path runs)."""
        if native_for(m, cache["conv"], self.backend, DECODE_ROWS) is None:
            return None
        keeping = bool(batch.keep) and any(batch.keep)
        return delta_decode(m, a, b, z, cache, batch.slot_tensor, batch.keep_tensor, keeping, self.small_weights(),
                            self.norm.eps, (self.n_k, self.d_k, self.d_v), self.backend)

    def decode_args(self) -> "DeltaDecodeArgs | None":
        """What a decode plan (layers/decode_plan.py) runs this layer with; None where in_proj_qkv, in_proj_z
        and out_proj are not int4 for the fused kernels (one group size), or in_proj_a/b not fp32."""
        q4 = [int4_parts(m) for m in (self.in_proj_qkv, self.in_proj_z, self.out_proj)]
        f32 = [f32_weight(self.in_proj_a), f32_weight(self.in_proj_b)]
        if any(p is None for p in (*q4, *f32)) or len({g for _, g in q4}) != 1:
            return None
        small = (self.conv1d.weight, self.A_log, self.dt_bias, self.norm.weight)
        return DeltaDecodeArgs([q4[0][0], q4[1][0]], f32, q4[2][0], q4[0][1], self.small_weights(), self.norm.eps,
                               (self.n_k, self.d_k, self.d_v),
                               [t for p, _ in q4 for t in p] + f32 + list(small))

    @staticmethod
    def _capture(cache: dict[str, torch.Tensor], snap: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        """Copy one sequence's states into prefix-cache snapshot slot `snap` (cache.SnapshotStore)."""
        cache["snap_conv"][snap] = conv
        cache["snap_state"][snap] = state

    def _gates(self, a: torch.Tensor, b: torch.Tensor):
        """in_proj_a, in_proj_b outputs -> g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b) (fp32)."""
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        return g, torch.sigmoid(b).float()

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        N = x.shape[0]
        m, z, a, b = project(x, self.in_proj_qkv, self.in_proj_z, self.in_proj_a, self.in_proj_b)
        z = z.view(N, self.n_v, self.d_v)                                      # m [N, C]; a, b [N, Hv]
        conv_c, state_c = cache["conv"], cache["state"]
        if batch.is_decode and (y := self._decode(m, a, b, z, cache, batch)) is not None:
            self.capture_decode(cache, batch)
            return self.out_proj(y)
        o = torch.empty(N, self.n_v, self.d_v, dtype=torch.float32, device=x.device)
        if batch.is_decode:  # one token per sequence: all sequences in one recurrent step
            self._steps(m, a, b, cache, batch, list(range(len(batch.slots))), 1, o)
            self.capture_decode(cache, batch)
        else:
            short: dict[int, list[int]] = {}       # T -> sequences adding T tokens, run by the fused recurrence
            g = beta = None
            for i, slot in enumerate(batch.slots):
                n = batch.lens[i]
                if n <= SHORT and not (batch.captures and batch.captures[i]):
                    short.setdefault(n, []).append(i)
                    continue
                if g is None:
                    g, beta = self._gates(a, b)
                lo_, hi_ = batch.cu[i], batch.cu[i + 1]
                caps = dict(batch.captures[i]) if batch.captures else {}
                # split the chunk where a prefix-cache snapshot wants the state (the recurrence is sequential)
                cuts = [lo_ + k for k in sorted(caps) if k < hi_ - lo_]
                for lo, hi in zip([lo_, *cuts], [*cuts, hi_]):
                    oi, conv, state = self._mix(m[None, lo:hi], g[None, lo:hi], beta[None, lo:hi],
                                                conv_c[slot:slot + 1], state_c[slot:slot + 1], hi - lo == 1)
                    conv_c[slot], state_c[slot] = conv[0].to(conv_c.dtype), state[0]
                    o[lo:hi] = oi[0]
                    if hi - lo_ in caps:
                        self._capture(cache, caps[hi - lo_], conv_c[slot], state_c[slot])
            for T, members in short.items():
                self._steps(m, a, b, cache, batch, members, T, o)
        o = self.norm(o.to(x.dtype), z)
        return self.out_proj(o.reshape(N, self.value_dim))


class DeltaDecodeArgs(NamedTuple):
    in_q4: list                # in_proj_qkv, in_proj_z: int4 parts (multi_linear)
    in_f32: list               # in_proj_a, in_proj_b: fp32 weights (multi_linear)
    out: list                  # out_proj's int4 parts (q4q8_gemv)
    group: int
    small: tuple               # fp32 (conv weight [C, W], A_log, dt_bias, norm weight) (delta_decode)
    eps: float                 # the output norm's
    dims: tuple                # (n_k, d_k, d_v)
    watched: list              # the tensors read: one replaced -> the plan is rebuilt
