"""Routed experts: y = sum_i w_i * down_e( silu(gate_e x) * up_e x ) over each token's top-k experts.

  x        [N, H]        tokens
  topk_ids [N, k] int64, topk_w [N, k] (already renormalised)
  gate_up  [E, 2I, H]    rows 0..I-1 gate, I..2I-1 up;  down [E, H, I]
Weights may be stored in a lower precision than x; they are cast per used expert.
`moe` loops over the used experts (it reads the expert counts on the host); `moe_grouped` runs every expert in
two grouped GEMMs with no host read, so a CUDA graph can capture it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(x, topk_ids, topk_w, gate_up, down):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for slot in range(topk_ids.shape[1]):
            e = int(topk_ids[n, slot])
            g, u = (gate_up[e].to(x.dtype) @ x[n]).chunk(2)
            out[n] += topk_w[n, slot].to(x.dtype) * (down[e].to(x.dtype) @ (F.silu(g) * u))
    return out


def float_linear(x, w):
    from ..kernels import float_linear as linear     # row-count-independent for decode-sized steps
    return linear(x, w)


def moe(x, topk_ids, topk_w, gate_up, down, linear=float_linear):
    """Group tokens by expert and run each used expert once (no loop over unused experts).
    gate_up[e] / down[e] are whatever `linear(x, w)` multiplies by: float tensors, or packed quantized
    weights with `linear=kernels.qlinear`."""
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
