"""x @ W^T for a float or a quantized W (ops/qformat.py), by the route the backend allows.

  linear(x, w, backend, bias)   the dispatcher: `float_linear` for a float w, `qlinear` for a quantized one
  multi_linear(x, ws, backend)  several weights on one x in one native call (decode), or None

Routes for a quantized W [N, K] (references: `qlinear_reference` dequantizes and calls F.linear;
`qlinear_act8_reference` is what the int8-activation route computes):
  int8 weights                        q8w_linear (fp32 activations)
  int4, backend.act8, groups % 128    int4 x int8-rounded activations: q4q8_linear for a large step (more than
                                      PREFILL_ROWS rows, or prefill=True), q4q8_gemv for a small one
  int4, otherwise                     a large step dequantizes once and uses the fp32 GEMM; a small one the
                                      fp32-activation q4_linear (AVX-512 build where present)
Anything the kernels cannot take (no native build, not fp32, widths not a multiple of 32) takes the reference.
Float weights: up to PREFILL_ROWS fp32 rows through `f32_linear`, whose every row is computed alike whatever
the row count (MKL's gemv and gemm round differently), so verifying 1 + k tokens gives the logits decoding
would, bit for bit; larger steps through F.linear. The step's row count decides, not a slice's: a large
step's experts (ops/moe.py) take F.linear however few rows each expert gets, rounding as transformers does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import PREFILL_ROWS, Backend
from .qformat import dequantize, group_of, in_width


def qlinear_reference(x: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(x, dequantize(packed).to(x.dtype))


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] rounded as `q4q8_linear` rounds it: per row and group of `group`, a = max|x| / 127 and
    x ~ a * round(x * (127 / max|x|)) in [-127, 127]. Returns that approximation of x (fp32)."""
    M, K = x.shape
    g = x.float().reshape(M, K // group, group)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv).clamp(-127, 127) * (amax / 127)).reshape(M, K)


def qlinear_act8_reference(x: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the int8-activation path computes, in float64: the rounded activations times the dequantized
    weight (the kernel's group sums are exact integers; only the final scaling rounds in fp32)."""
    return (quantize_activations(x, group_of(packed)).double() @ dequantize(packed).double().t()).float()


def native_ok(t: dict[str, torch.Tensor]) -> bool:
    """Whether the native kernels take this quantized weight's widths (blocks of 32, int4 groups too)."""
    K = in_width(t)
    if t["q"].dtype == torch.int8:
        return K % 32 == 0
    return K % 32 == 0 and (K // t["scale"].shape[-1]) % 32 == 0


def act8_ok(t: dict[str, torch.Tensor], backend: Backend) -> bool:
    """int4 weights the int8-activation kernels take: fp32 scales (as stored) and groups a multiple of 128
    (the decode kernels' chunk; prefill uses the same rule so that prefill and decode round alike)."""
    return backend.act8 and t["q"].dtype == torch.uint8 and t["scale"].dtype == torch.float32 \
        and group_of(t) % 128 == 0


def fused_ok(parts: list[dict[str, torch.Tensor]], backend: Backend) -> bool:
    """Whether the fused decode calls (moe_decode, multi_linear, the layer plan) take these quantized weights:
    int4 for the int8-activation kernels, mins stored in fp32, one group size."""
    return all(act8_ok(t, backend) and "min" in t and t["min"].dtype == torch.float32 for t in parts) \
        and len({group_of(t) for t in parts}) <= 1


def kernel_args(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """An int4 weight's parts as the fused native calls take them."""
    return [t["q"], t["scale"], t["min"]]


def qlinear(x: torch.Tensor, packed: dict[str, torch.Tensor], backend: Backend,
            prefill: bool | None = None) -> torch.Tensor:
    """x [..., K] @ W^T for a quantized W [N, K] (as stored). prefill: whether this belongs to a large step
    (the panel kernel for int8 activations); None decides by the row count."""
    ext = backend.native if x.device.type == "cpu" else None
    q = packed["q"]
    K = in_width(packed)
    if ext is None or x.dtype != torch.float32 or not native_ok(packed):
        return qlinear_reference(x, packed)
    x2 = x.reshape(-1, K).contiguous()
    large = x2.shape[0] > PREFILL_ROWS if prefill is None else prefill
    if q.dtype == torch.int8:
        y = ext.q8w_linear(x2, q, packed["scale"])
    elif act8_ok(packed, backend):
        kernel = backend.native512.q4q8_linear if large else backend.native512.q4q8_gemv
        y = kernel(x2, q, packed["scale"], packed["min"], group_of(packed))
    elif x2.shape[0] > PREFILL_ROWS:
        y = F.linear(x2, ext.q4_dequant(q, packed["scale"], packed["min"], group_of(packed), False))
    else:
        y = backend.int4.q4_linear(x2, q, packed["scale"], packed["min"], group_of(packed))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def float_linear(x: torch.Tensor, w: torch.Tensor, backend: Backend, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ bias) for a float w (see the module text for the routes)."""
    w = w.to(x.dtype)
    ext = backend.native if x.device.type == "cpu" else None
    x2 = x.reshape(-1, x.shape[-1])
    if ext is None or x.dtype != torch.float32 or x2.shape[0] > PREFILL_ROWS or x2.shape[0] == 0:
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    y = ext.f32_linear(x2, w)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear(x: torch.Tensor, w, backend: Backend, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias): w a float tensor or a quantized weight's parts (a dict, ops/qformat.py)."""
    if not isinstance(w, dict):
        return float_linear(x, w, backend, bias)
    y = qlinear(x, w, backend)
    return y if bias is None else y + bias.to(y.dtype)


def multi_linear(x: torch.Tensor, weights: list, backend: Backend) -> list[torch.Tensor] | None:
    """x [M, K] times several weights in one native call (csrc/qkernels512.cpp multi_linear): each weight a
    quantized dict (int4 for the int8-activation kernels, mins stored) or an fp32 [N, K] tensor. The same
    values as `linear` one by one; None where the call cannot take them (then run those)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or not 0 < x.shape[0] <= PREFILL_ROWS:
        return None
    q4 = [w for w in weights if isinstance(w, dict)]
    f32 = [w for w in weights if not isinstance(w, dict)]
    if not q4 or not fused_ok(q4, backend) or any(w["q"].dim() != 2 for w in q4) \
            or not all(w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous() for w in f32) \
            or backend.native is None:
        return None
    outs = backend.native512.multi_linear(x.contiguous(), [kernel_args(w) for w in q4], f32, group_of(q4[0]))
    it_q, it_f = iter(outs[:len(q4)]), iter(outs[len(q4):])
    return [next(it_q) if isinstance(w, dict) else next(it_f) for w in weights]
