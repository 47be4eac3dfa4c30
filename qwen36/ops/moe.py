"""Routed experts: y = sum_i w_i * down_e( silu(gate_e x) * up_e x ) over each token's top-k experts.

  x        [N, H]        tokens
  topk_ids [N, k] int64, topk_w [N, k] (already renormalised)
  gate_up  [E, 2I, H]    rows 0..I-1 gate, I..2I-1 up;  down [E, H, I]
Weights may be stored in a lower precision than x (cast per used expert), or quantized (a `StackedQuant`
of ops/qformat.py, leading expert axis).

`routed_experts` is the dispatcher; the routes it picks from:
  moe_grouped      float experts on a GPU: two grouped GEMMs, no host read (a CUDA graph can capture it)
  grouped_experts  quantized, decode-sized (up to GROUPED_ROWS pairs): every (token, expert) pair in two
                   native calls
  sorted_experts   quantized, larger (int8-activation CPUs): pairs sorted by expert, each used expert's
                   weights read once for all its rows, in two native calls
  moe              otherwise: a loop over the used experts (it reads the expert counts on the host)
`moe_decode` is the whole sparse-MoE block of a decode-sized step (router, experts, shared expert) in one call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import GROUPED_ROWS, PREFILL_ROWS, Backend
from .linear import act8_ok, float_linear, kernel_args, native_ok, qlinear
from .qformat import StackedQuant, group_of


def moe_reference(x, topk_ids, topk_w, gate_up, down):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for slot in range(topk_ids.shape[1]):
            e = int(topk_ids[n, slot])
            g, u = (gate_up[e].to(x.dtype) @ x[n]).chunk(2)
            out[n] += topk_w[n, slot].to(x.dtype) * (down[e].to(x.dtype) @ (F.silu(g) * u))
    return out


def cast_linear(x, w):
    """x @ w^T with w cast to x's dtype (the plain tensor-op linear of `moe`)."""
    return F.linear(x, w.to(x.dtype))


def moe(x, topk_ids, topk_w, gate_up, down, linear=cast_linear):
    """Group tokens by expert and run each used expert once (no loop over unused experts).
    gate_up[e] / down[e] are whatever `linear(x, w)` multiplies by: float tensors, or a quantized expert's
    parts with a `linear` that takes them (ops.linear.qlinear)."""
    N, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=len(gate_up)).tolist()
    token = order // k                                                         # token of each sorted pair
    weight = topk_w.reshape(-1)[order].to(x.dtype)
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        idx = token[start:start + c]
        g, u = linear(x[idx], gate_up[e]).chunk(2, dim=-1)
        y = linear(F.silu(g) * u, down[e])
        out.index_add_(0, idx, y * weight[start:start + c, None])
        start += c
    return out


def grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `moe_grouped` can take x and expert weights w: torch._grouped_mm present, one dtype, rows a
    multiple of 16 bytes; on a GPU only bf16 on compute capability 9.0+ (what the CUDA kernel takes)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or any(s * x.element_size() % 16 for s in w.shape[1:]):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return (x.device.type == "meta" and x.dtype == torch.bfloat16) or x.device.type == "cpu"


def moe_grouped(x, topk_ids, topk_w, gate_up, down):
    """`moe` as two grouped GEMMs over the (token, expert) pairs sorted by expert (check `grouped_ok` first).
    No host read and fixed shapes for a fixed N: CUDA graphs capture it. Each token's k outputs are summed
    in fp32 in slot order (deterministic: no atomics)."""
    N, k = topk_ids.shape
    E = gate_up.shape[0]
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)                                         # pairs by expert
    ends = torch.searchsorted(flat[order], torch.arange(E, device=x.device), right=True).to(torch.int32)
    h = torch._grouped_mm(x[order // k], gate_up.transpose(1, 2), offs=ends)                  # [N*k, 2I]
    g, u = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=ends)                     # [N*k, H]
    pairs = torch.empty_like(y)
    pairs[order] = y * topk_w.reshape(-1)[order, None].to(y.dtype)                          # back to (token, slot)
    return pairs.view(N, k, -1).float().sum(1).to(x.dtype)


# ------------------------------------------------------------------------------ quantized experts, native
def grouped_experts_ok(stacked: dict[str, torch.Tensor], backend: Backend) -> bool:
    """Whether `qlinear_experts` can take these stacked int4 expert weights."""
    return backend.native is not None and stacked["q"].dtype == torch.uint8 and native_ok(stacked)


def qlinear_experts(x: torch.Tensor, stacked: dict[str, torch.Tensor], ids: torch.Tensor,
                    backend: Backend) -> torch.Tensor:
    """Row t of x times expert ids[t]'s weight, all rows in one call (decode; check `grouped_experts_ok`
    first). x [T, K] fp32 or [1, K] (shared by every row); stacked parts carry a leading expert axis."""
    if act8_ok(stacked, backend):
        kernel = backend.native512.q4q8_moe
    else:
        kernel = backend.int4.q4_moe_linear
    return kernel(x.contiguous(), stacked["q"], stacked["scale"], stacked["min"], group_of(stacked), ids)


def sorted_experts_ok(stacked: dict[str, torch.Tensor], backend: Backend) -> bool:
    """Whether `qlinear_experts_sorted` can take these stacked int4 expert weights (int8-activation CPUs)."""
    return backend.native512 is not None and act8_ok(stacked, backend)


def qlinear_experts_sorted(x: torch.Tensor, stacked: dict[str, torch.Tensor], offsets: torch.Tensor,
                           backend: Backend) -> torch.Tensor:
    """Prefill's grouped experts: x [T, K] rows sorted by expert, rows offsets[e] .. offsets[e+1]-1 times
    expert e's weight, every used expert in one call (check `sorted_experts_ok` first)."""
    return backend.native512.q4q8_moe_sorted(x.contiguous(), stacked["q"], stacked["scale"], stacked["min"],
                                             group_of(stacked), offsets)


def grouped_experts(x, topk_ids, topk_w, gate_up: StackedQuant, down: StackedQuant,
                    backend: Backend) -> torch.Tensor | None:
    """Decode: every (token, chosen expert) pair in two kernel calls, no loop over experts.
    x [N, H], ids / w [N, k]; None where the grouped kernel is unavailable."""
    if x.dtype != torch.float32 or x.device.type != "cpu" \
            or not (grouped_experts_ok(gate_up.tensors, backend) and grouped_experts_ok(down.tensors, backend)):
        return None
    N, k = topk_ids.shape
    rows = topk_ids.reshape(-1)
    gu = qlinear_experts(x if N == 1 else x.repeat_interleave(k, 0), gate_up.tensors, rows, backend)
    g, u = gu.chunk(2, dim=-1)
    y = qlinear_experts(F.silu(g) * u, down.tensors, rows, backend)                     # [N*k, H]
    return (y.view(N, k, -1) * topk_w.view(N, k, 1).to(y.dtype)).sum(1)


def sorted_experts(x, topk_ids, topk_w, gate_up: StackedQuant, down: StackedQuant,
                   backend: Backend) -> torch.Tensor | None:
    """Prefill: the (token, chosen expert) pairs sorted by expert, each used expert's weights read once
    for all its rows, in two kernel calls (no loop over experts); None where the kernel is unavailable.
    Sums in the same order as `moe` (pairs by expert, stably)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" \
            or not (sorted_experts_ok(gate_up.tensors, backend) and sorted_experts_ok(down.tensors, backend)):
        return None
    N, k = topk_ids.shape
    E = len(gate_up)
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    offsets = torch.zeros(E + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(flat, minlength=E).cumsum(0)
    token = order // k
    gu = qlinear_experts_sorted(x[token], gate_up.tensors, offsets, backend)
    g, u = gu.chunk(2, dim=-1)
    y = qlinear_experts_sorted(F.silu(g) * u, down.tensors, offsets, backend)           # [N*k, H]
    return torch.zeros_like(x).index_add_(0, token, y * topk_w.reshape(-1)[order, None].to(y.dtype))


def routed_experts(x, topk_ids, topk_w, gate_up, down, backend: Backend) -> torch.Tensor:
    """The routed experts' weighted sum for x [N, H] routed to topk_ids / topk_w [N, k], by the fastest route
    the weights (float [E, ...] tensors or StackedQuant), the device and the backend allow."""
    N, k = topk_ids.shape
    if isinstance(gate_up, StackedQuant):
        routed = None
        if N * k <= GROUPED_ROWS:
            routed = grouped_experts(x, topk_ids, topk_w, gate_up, down, backend)
        else:
            routed = sorted_experts(x, topk_ids, topk_w, gate_up, down, backend)
        if routed is not None:
            return routed
        # a large step: each expert's rows are few, but the step counts as prefill
        prefill = True if N > PREFILL_ROWS else None
        return moe(x, topk_ids, topk_w, gate_up, down, lambda xe, we: qlinear(xe, we, backend, prefill))
    if x.device.type != "cpu" and grouped_ok(x, gate_up):
        return moe_grouped(x, topk_ids, topk_w, gate_up, down)     # GPU: no host read, graph-safe
    if N > PREFILL_ROWS:    # a large step rounds as transformers' GEMM does, however few rows each expert has
        return moe(x, topk_ids, topk_w, gate_up, down)              # F.linear
    return moe(x, topk_ids, topk_w, gate_up, down, lambda xe, we: float_linear(xe, we, backend))


def moe_decode(x: torch.Tensor, router: torch.Tensor, top_k: int, stacked: list[dict[str, torch.Tensor]],
               shared: list[dict[str, torch.Tensor]], shared_gate: torch.Tensor, backend: Backend):
    """The sparse-MoE block of a decode-sized step in one native call (csrc/qkernels512.cpp moe_decode; check
    `ops.linear.fused_ok` on its weights first). stacked: (gate_up, down) of the routed experts; shared:
    (gate, up, down) of the shared expert. x [N, H] fp32 -> (out [N, H], expert ids [N, k], weights [N, k])."""
    gate_up, down = stacked
    s_gate, s_up, s_down = shared
    return backend.native512.moe_decode(x.contiguous(), router.contiguous(), top_k, kernel_args(gate_up),
                                        kernel_args(down), kernel_args(s_gate), kernel_args(s_up),
                                        kernel_args(s_down), shared_gate.contiguous(), group_of(gate_up))
