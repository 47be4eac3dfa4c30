"""Matmul kernels for quantized weights: `pack` a quantized tensor once, `qlinear(x, packed)` per call.

Fast path: our C++ kernels (csrc/qkernels.cpp: AVX2/FMA, weights read once, never expanded to fp32),
compiled on first use with torch's cpp_extension into the cache directory (about a minute, once). Why our
own: on this CPU (2 cores) PyTorch's int4 op needs bf16 activations and its fp32 path runs at well under
1 GB/s, and its int8 op is as slow with fp32 activations; ours reads int4 weights at ~10 GB/s per thread
(measurements in the README). Large batches (prefill) dequantize once and use the fp32 GEMM. Anything
the kernels cannot take (no compiler, widths not a multiple of 32) uses the reference path: dequantize and
F.linear, which is also what the fast path is tested against.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

_ext = None                      # the compiled module, False if it could not be built
PREFILL_ROWS = 64                # above this many rows, dequantize once and use the fp32 GEMM


def native():
    """The compiled kernels, building them on first use; None where unavailable."""
    global _ext
    if _ext is None:
        _ext = False
        if os.environ.get("QWEN36_NO_NATIVE") != "1" and sys.platform.startswith("linux") \
                and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            try:
                from torch.utils.cpp_extension import load

                from .paths import cache_dir
                build = cache_dir() / "build" / f"qkernels-torch{torch.__version__}"
                build.mkdir(parents=True, exist_ok=True)
                _ext = load(name="qwen36_qkernels", sources=[str(Path(__file__).parent / "csrc" / "qkernels.cpp")],
                            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                            extra_ldflags=["-fopenmp"], build_directory=str(build),
                            verbose=False)
            except Exception as e:  # noqa: BLE001 - no compiler etc.: the reference path still works
                warnings.warn(f"qwen36: quantized kernels could not be built ({e}); using the slow reference path")
                _ext = False
    return _ext or None


def pack(t: dict[str, torch.Tensor]):
    return {k: v.contiguous() for k, v in t.items()}


def unpack(packed) -> dict[str, torch.Tensor]:
    return packed


def qlinear_reference(x: torch.Tensor, packed) -> torch.Tensor:
    from .quant import dequantize

    return F.linear(x, dequantize(packed).to(x.dtype))


def _native_ok(packed, K: int) -> bool:
    if packed["q"].dtype == torch.int8:
        return K % 32 == 0
    return K % 32 == 0 and (K // packed["scale"].shape[-1]) % 32 == 0


def qlinear(x: torch.Tensor, packed) -> torch.Tensor:
    """x [..., K] @ W^T for a quantized W [N, K] (as stored: see quant.py)."""
    ext = native()
    q = packed["q"]
    K = q.shape[-1] * (1 if q.dtype == torch.int8 else 2)
    if ext is None or x.dtype != torch.float32 or not _native_ok(packed, K):
        return qlinear_reference(x, packed)
    x2 = x.reshape(-1, K).contiguous()
    if q.dtype == torch.int8:
        y = ext.q8w_linear(x2, q, packed["scale"])
    elif x2.shape[0] > PREFILL_ROWS:
        y = F.linear(x2, ext.q4_dequant(q, packed["scale"], packed["min"], K // packed["scale"].shape[-1], False))
    else:
        y = ext.q4_linear(x2, q, packed["scale"], packed["min"], K // packed["scale"].shape[-1])
    return y.reshape(*x.shape[:-1], y.shape[-1])


def grouped_ok(stacked: dict[str, torch.Tensor]) -> bool:
    """Whether `qlinear_experts` can take these stacked int4 expert weights."""
    q = stacked["q"]
    return native() is not None and q.dtype == torch.uint8 and _native_ok(stacked, q.shape[-1] * 2)


def qlinear_experts(x: torch.Tensor, stacked: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Row t of x times expert ids[t]'s weight, all rows in one call (decode; check `grouped_ok` first).
    x [T, K] fp32 or [1, K] (shared by every row); stacked parts carry a leading expert axis."""
    K = stacked["q"].shape[-1] * 2
    return native().q4_moe_linear(x.contiguous(), stacked["q"], stacked["scale"], stacked["min"],
                                  K // stacked["scale"].shape[-1], ids)
