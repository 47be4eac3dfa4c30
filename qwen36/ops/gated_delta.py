"""The gated delta rule (Gated DeltaNet's recurrence). Derivation: gated_delta.md beside this file.

Shapes (B batch, H value heads, T tokens, K key dim, V value dim):
  q, k   [B, H, T, K]  fp32, already expanded to the value heads, L2-normalised, q scaled by K^-0.5
  v      [B, H, T, V]  fp32
  g      [B, H, T]     fp32 log-decay (<= 0);  beta [B, H, T] fp32 in (0, 1)
  state  [B, H, K, V]  fp32 recurrent state S; o_t = S_t^T q_t
Every function returns (o [B, H, T, V], new_state [B, H, K, V]) and never writes its inputs, except the
*_steps functions and the native decode calls, which update the cache's states in place.

Dispatchers (each beside its reference):
  gated_delta          a chunk of one sequence: chunked (prefill) or recurrent (decode) tensor ops, or fla-core's
                       Triton kernels for a GPU's low-precision prefill
  gated_delta_steps    T tokens of B sequences token by token, states in the cache (native delta_steps)
  delta_prep           the native glue before the recurrence (conv, SiLU, q/k norms, gates) for short steps;
  delta_decode         a whole decode step from the projections to the output norm: the tensor-op forms of
                       both are the layer's own path (layers/deltanet.py), which the tests compare them with
"""
from __future__ import annotations

import torch

from . import native as native_build
from .backend import PREFILL_ROWS, Backend

EMPTY = torch.empty(0)          # "none" for the native calls' optional tensors


def gated_delta_reference(q, k, v, g, beta, state):
    """Plain per-token form: S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,  o_t = S_t^T q_t."""
    B, H, T, K = k.shape
    eye = torch.eye(K, dtype=state.dtype, device=state.device)
    S = state.clone()
    outs = []
    for t in range(T):
        kt, vt, qt = k[:, :, t], v[:, :, t], q[:, :, t]                       # [B, H, K|V]
        a, b = g[:, :, t].exp()[..., None, None], beta[:, :, t][..., None, None]
        S = a * (eye - b * kt[..., :, None] * kt[..., None, :]) @ S + b * kt[..., :, None] * vt[..., None, :]
        outs.append((S * qt[..., :, None]).sum(-2))
    return torch.stack(outs, dim=2), S


def gated_delta_recurrent(q, k, v, g, beta, state):
    """Token-by-token form used for decode (T is usually 1): decay, predict, correct, read."""
    S = state
    outs = []
    for t in range(k.shape[2]):
        S = S * g[:, :, t].exp()[..., None, None]
        kt = k[:, :, t].unsqueeze(-2)                                          # [B, H, 1, K]
        pred = (kt @ S).squeeze(-2)                                            # S^T k   [B, H, V]
        delta = (v[:, :, t] - pred) * beta[:, :, t, None]                      # [B, H, V]
        S = S + kt.transpose(-1, -2) * delta.unsqueeze(-2)                     # + k delta^T
        outs.append((q[:, :, t].unsqueeze(-2) @ S).squeeze(-2))
    return torch.stack(outs, dim=2), S


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int = 64):
    """Chunked (WY / UT-transform) form used for prefill: one triangular solve and a few matmuls per chunk."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    pad = (-T) % chunk
    if pad:  # zero keys, values, beta and decay leave the state untouched
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)

    gam = g.cumsum(-1)                                                         # [B, H, n, C]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # Γ [.., C, C]
    kb = k * beta[..., None]
    lower = (kb @ k.transpose(-1, -2)) * decay                                 # diag(β) K K^T ⊙ Γ
    rhs = torch.cat([v * beta[..., None], kb * gam.exp()[..., None]], dim=-1)  # [βV | β e^γ K]
    uw = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    U, W = uw[..., :V], uw[..., V:]
    q_read = q * gam.exp()[..., None]                                          # reads the state at chunk start
    k_write = k * (gam[..., -1:] - gam).exp()[..., None]                       # decayed to chunk end
    intra = (q @ k.transpose(-1, -2)) * decay                                  # [.., C, C]
    last = gam[..., -1].exp()[..., None, None]                                 # [B, H, n, 1, 1]

    S = state
    out = torch.empty(B, H, n, chunk, V, dtype=v.dtype, device=v.device)
    for i in range(n):
        Vn = U[:, :, i] - W[:, :, i] @ S                                       # corrected values
        out[:, :, i] = q_read[:, :, i] @ S + intra[:, :, i] @ Vn
        S = last[:, :, i] * S + k_write[:, :, i].transpose(-1, -2) @ Vn
    return out.reshape(B, H, n * chunk, V)[:, :, :T], S


def gated_delta_decode_reference(state, slots, q, k, v, g, beta):
    """One decode step for B sequences whose states live in `state` [S, H, K, V] at rows `slots` [B],
    updated in place. q, k [B, Hk, K] (each key head serves H / Hk value heads); v [B, H, V]; g, beta [B, H].
    Returns o [B, H, V]. (It and the *_steps functions are the ones here that write an input: the cache's
    states.)"""
    rep = state.shape[1] // q.shape[1]
    q, k = (t.repeat_interleave(rep, dim=1)[:, :, None] for t in (q, k))
    o, new = gated_delta_recurrent(q, k, v[:, :, None], g[:, :, None], beta[:, :, None], state[slots])
    state[slots] = new
    return o[:, :, 0]


def gated_delta_steps_reference(state, slots, q, k, v, g, beta, keep=None, nkeep=None):
    """T tokens for each of B sequences whose states live in `state` [S, H, K, V] at rows `slots` [B],
    updated in place. q, k [B, T, Hk, K]; v [B, T, H, V]; g, beta [B, T, H]. Returns o [B, T, H, V].
    keep [S, Tk, H, K, V], nkeep [B]: the state after token t < nkeep[b] is also written to
    keep[slots[b], t] (where speculative decoding resumes after a rejected draft)."""
    outs = []
    for t in range(q.shape[1]):
        outs.append(gated_delta_decode_reference(state, slots, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t]))
        if keep is not None:
            for b, slot in enumerate(slots.tolist()):
                if t < int(nkeep[b]):
                    keep[slot, t] = state[slot]
    return torch.stack(outs, dim=1)


def gated_delta_steps(state, slots, q, k, v, g, beta, backend: Backend, keep=None, nkeep=None):
    """gated_delta_steps_reference, fused (csrc/qkernels.cpp `delta_steps`) where the backend has the native
    kernels: each head's state stays in cache across the T tokens."""
    ext = backend.native if state.device.type == "cpu" else None
    if ext is None or state.dtype != torch.float32 or (
            keep is not None and (keep.dtype != torch.float32 or not keep.is_contiguous())):
        return gated_delta_steps_reference(state, slots, q, k, v, g, beta, keep, nkeep)
    if keep is None:
        keep = torch.empty(0, dtype=torch.float32)
        nkeep = torch.zeros(len(slots), dtype=torch.long)
    return ext.delta_steps(state, slots, *(t.float().contiguous() for t in (q, k, v, g, beta)), keep,
                           torch.as_tensor(nkeep, dtype=torch.long))


def fla_kernels():
    """(chunk_gated_delta_rule, fused_recurrent_gated_delta_rule) from fla-core (`pip install 'qwen36[cuda]'`)
    where it is installed; else None. (Whether a model uses them is its backend's `fla`.)"""
    return native_build.load_fla()


def gated_delta_fla(q, k, v, g, beta, state, recurrent: bool = False):
    """The same rule through fla-core's Triton kernels (GPU prefill): its chunked form, or its fused
    recurrence (one pass over the tokens). fla takes [B, T, H, D] and scales q itself: ours is already scaled
    (scale 1) and normalised (no in-kernel norm); its state layout [B, H, K, V] is ours."""
    chunk, fused = fla_kernels()
    rule = fused if recurrent else chunk
    o, new = rule(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g=g.transpose(1, 2),
                  beta=beta.transpose(1, 2), scale=1.0, initial_state=state.float(), output_final_state=True,
                  use_qk_l2norm_in_kernel=False)
    return o.transpose(1, 2).to(v.dtype), new


def gated_delta(q, k, v, g, beta, state, backend: Backend, decode: bool = False, low_precision: bool = False):
    """One sequence's chunk: the recurrent form for decode, the chunked form for prefill, or fla-core's Triton
    kernels for a GPU's prefill of a bf16/fp16 model (their fp32 dots may round through tf32: an fp32 model
    keeps the exact tensor ops)."""
    if q.device.type == "cuda" and low_precision and not decode and backend.fla is not None:
        return gated_delta_fla(q, k, v, g, beta, state)
    rule = gated_delta_recurrent if decode else gated_delta_chunked
    return rule(q, k, v, g, beta, state)


def native_for(m: torch.Tensor, conv_cache: torch.Tensor, backend: Backend, max_rows: int | None = None):
    """The native kernels where `delta_prep` / `delta_decode` take this step (fp32 projections and conv
    states on the CPU; at most max_rows sequences), else None."""
    if m.dtype != torch.float32 or conv_cache.dtype != torch.float32 or m.device.type != "cpu" \
            or (max_rows is not None and m.shape[0] > max_rows):
        return None
    return backend.native


def delta_prep(m, a, b, conv_cache, conv_weight, slots, A_log, dt_bias, keep_conv, nkeep, dims, backend: Backend):
    """Short steps' glue in one native call (csrc/qkernels.cpp delta_prep; check `native_for` first): the
    causal conv over the cached inputs (conv states updated in place, the first nkeep[b] ones also kept in
    keep_conv), SiLU, q/k L2 norms and scale, g and beta. m [B, T, C], a, b [B, T, Hv]; dims (n_k, d_k, d_v).
    Returns q, k, v, g, beta as `gated_delta_steps` takes them."""
    return backend.native.delta_prep(m, a.float(), b.float(), conv_cache, conv_weight, slots, A_log.float(),
                                     dt_bias.float(), keep_conv, nkeep, *dims)


def delta_decode(m, a, b, z, cache: dict[str, torch.Tensor], slots, nkeep, keeping: bool, small: tuple, eps: float,
                 dims, backend: Backend) -> torch.Tensor:
    """A decode step (one token for each of B sequences) from the projections to the output norm in one native
    call (delta_decode: delta_prep, delta_steps, gated_rms_norm; check `native_for` with PREFILL_ROWS first).
    small: fp32 (conv weight [C, W], A_log, dt_bias, norm weight); keeping: the states after the token also go
    to the cache's spec_* rows. Returns [B, Hv * Dv]."""
    B = m.shape[0]
    conv_w, A_log, dt_bias, norm_w = small
    empty = EMPTY
    return backend.native.delta_decode(m.view(B, 1, -1), a.view(B, 1, -1), b.view(B, 1, -1), cache["conv"], conv_w,
                                       slots, A_log, dt_bias, cache["spec_conv"] if keeping else empty, nkeep,
                                       cache["state"], cache["spec_state"] if keeping else empty, z.reshape(B, -1),
                                       norm_w, eps, *dims)


DECODE_ROWS = PREFILL_ROWS      # delta_decode takes up to this many sequences (a decode-sized step)
