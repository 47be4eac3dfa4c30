"""Matmul kernels for quantized weights: `pack` a quantized tensor once, `qlinear(x, packed)` per call.

Fast path: our C++ kernels (csrc/qkernels.cpp: AVX2/FMA, weights read once, never expanded to fp32;
csrc/qkernels512.cpp: the int4 ones again for AVX-512 CPUs, ~25 % faster decode on this machine),
compiled on first use with torch's cpp_extension into the cache directory (about a minute, once). Why our
own: on this CPU (2 cores) PyTorch's int4 op needs bf16 activations and its fp32 path runs at well under
1 GB/s, and its int8 op is as slow with fp32 activations; ours reads int4 weights at ~10 GB/s per thread
(measurements in docs/performance.md). Where the CPU has AVX-512 VNNI, int4 weights multiply int8-rounded
activations (per row and weight group; `quantize_activations` is the rounding, `qlinear_act8_reference`
the math): `q4q8_linear` for large batches (prefill, more than PREFILL_ROWS rows; ~5x the fp32 GEMM's
multiply rate here), `q4q8_gemv` / `q4q8_moe` for decode (weights read as stored, ~1.4x the fp32-activation
kernels' bandwidth on large matrices). Both need groups a multiple of 128 (the default). The accuracy cost is in docs/quantization.md's
table; QWEN36_ACT8=0 keeps fp32 activations everywhere. Otherwise large batches dequantize
once and use the fp32 GEMM, and small ones use the fp32-activation kernels. Anything
the kernels cannot take (no compiler, widths not a multiple of 32) uses the reference path: dequantize and
F.linear, which is also what the fast path is tested against.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

_ext = None                      # the compiled module, False if it could not be built
_ext512 = None                   # the AVX-512 build of the int4 kernels (csrc/qkernels512.cpp), False if none
_vnni = None                     # whether that build may run its AVX-512 VNNI kernels (checked once)
PREFILL_ROWS = 64                # above this many rows, dequantize once and use the fp32 GEMM


def _build(name: str, source: str, flags: list[str]):
    from torch.utils.cpp_extension import load

    from .paths import cache_dir
    csrc = Path(__file__).parent / "csrc"
    # the sources and the shared header in the directory name: any change builds afresh (torch's own
    # check looks at the .cpp files only)
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in sorted(csrc.iterdir()) if f.suffix in (".cpp", ".h")))
    build = cache_dir() / "build" / f"{name}-torch{torch.__version__}-{digest.hexdigest()[:10]}"
    build.mkdir(parents=True, exist_ok=True)
    if not (build / f"{name}.so").exists():
        print(f"qwen36: compiling {source} into {build} (once, about a minute) ...", file=sys.stderr, flush=True)
    return load(name=name, sources=[str(csrc / source)],
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", *flags], extra_ldflags=["-fopenmp"],
                build_directory=str(build), verbose=False)


def native():
    """The compiled kernels, building them on first use; None where unavailable."""
    global _ext
    if _ext is None:
        _ext = False
        if os.environ.get("QWEN36_NO_NATIVE") != "1" and sys.platform.startswith("linux") \
                and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            try:
                _ext = _build("qwen36_qkernels", "qkernels.cpp", [])
            except Exception as e:  # noqa: BLE001 - no compiler etc.: the reference path still works
                warnings.warn(f"qwen36: quantized kernels could not be built ({e}); using the slow reference path")
                _ext = False
    return _ext or None


def native512():
    """The AVX-512 int4 kernels where the CPU has AVX-512 (and the AVX2 build works); else None.
    QWEN36_NO_AVX512=1 keeps the AVX2 kernels."""
    global _ext512
    if _ext512 is None:
        _ext512 = False
        if native() is not None and torch.backends.cpu.get_cpu_capability() == "AVX512" \
                and os.environ.get("QWEN36_NO_AVX512") != "1":
            try:
                _ext512 = _build("qwen36_qkernels512", "qkernels512.cpp",
                                 ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"])
            except Exception as e:  # noqa: BLE001 - the AVX2 kernels still work
                warnings.warn(f"qwen36: AVX-512 kernels could not be built ({e}); using the AVX2 ones")
                _ext512 = False
    return _ext512 or None


_ftz = threading.local()


def flush_denormals() -> bool:
    """Flush denormal floats to zero (x86: FTZ + DAZ) on the calling thread and the compute threads it runs
    on: DeltaNet's decays underflow into denormals, each ~100x slower to compute with, and a 512-token
    prefill chunk of the delta rule ran ~4x slower with them. Values below 1.2e-38 become 0 (the model's
    outputs do not move measurably). The setting is per thread and so is OpenMP's team of a thread: the
    loader calls this, and the engine again from whichever thread steps it (once per thread).
    QWEN36_DENORMALS=1 keeps them. Returns whether it applies."""
    if getattr(_ftz, "on", None) is not None:
        return _ftz.on
    ext = native()
    _ftz.on = ext is not None and os.environ.get("QWEN36_DENORMALS") != "1"
    if _ftz.on:
        torch.set_flush_denormal(True)
        ext.flush_denormals(True)
    return _ftz.on


def act8() -> bool:
    """Whether int4 weights may use int8 activations: AVX-512 VNNI present and QWEN36_ACT8 not 0 (read per
    call, so it can be switched at run time; the CPU check is made once)."""
    global _vnni
    if _vnni is None:
        ext = native512()
        _vnni = ext is not None and ext.has_vnni()
    return _vnni and os.environ.get("QWEN36_ACT8") != "0"


def pack(t: dict[str, torch.Tensor]):
    return {k: v.contiguous() for k, v in t.items()}


def unpack(packed) -> dict[str, torch.Tensor]:
    return packed


def qlinear_reference(x: torch.Tensor, packed) -> torch.Tensor:
    from .quant import dequantize

    return F.linear(x, dequantize(packed).to(x.dtype))


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] rounded as `q4q8_linear` rounds it: per row and group of `group`, a = max|x| / 127 and
    x ~ a * round(x * (127 / max|x|)) in [-127, 127]. Returns that approximation of x (fp32)."""
    M, K = x.shape
    g = x.float().reshape(M, K // group, group)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv).clamp(-127, 127) * (amax / 127)).reshape(M, K)


def qlinear_act8_reference(x: torch.Tensor, packed) -> torch.Tensor:
    """What the int8-activation path computes, in float64: the rounded activations times the dequantized
    weight (the kernel's group sums are exact integers; only the final scaling rounds in fp32)."""
    from .quant import dequantize

    group = packed["q"].shape[-1] * 2 // packed["scale"].shape[-1]
    return (quantize_activations(x, group).double() @ dequantize(packed).double().t()).float()


def _native_ok(packed, K: int) -> bool:
    if packed["q"].dtype == torch.int8:
        return K % 32 == 0
    return K % 32 == 0 and (K // packed["scale"].shape[-1]) % 32 == 0


def _group(t: dict[str, torch.Tensor]) -> int:
    return t["q"].shape[-1] * 2 // t["scale"].shape[-1]


def _act8_ok(t: dict[str, torch.Tensor]) -> bool:
    """int4 weights the int8-activation kernels take: fp32 scales (as stored) and groups a multiple of 128
    (the decode kernels' chunk; prefill uses the same rule so that prefill and decode round alike)."""
    return t["q"].dtype == torch.uint8 and t["scale"].dtype == torch.float32 and _group(t) % 128 == 0 and act8()


def qlinear(x: torch.Tensor, packed, prefill: bool | None = None) -> torch.Tensor:
    """x [..., K] @ W^T for a quantized W [N, K] (as stored: see quant.py). prefill: whether this belongs
    to a large step (the panel kernel for int8 activations); None decides by the row count."""
    ext = native() if x.device.type == "cpu" else None
    q = packed["q"]
    K = q.shape[-1] * (1 if q.dtype == torch.int8 else 2)
    if ext is None or x.dtype != torch.float32 or not _native_ok(packed, K):
        return qlinear_reference(x, packed)
    x2 = x.reshape(-1, K).contiguous()
    large = x2.shape[0] > PREFILL_ROWS if prefill is None else prefill
    if q.dtype == torch.int8:
        y = ext.q8w_linear(x2, q, packed["scale"])
    elif _act8_ok(packed):
        kernel = native512().q4q8_linear if large else native512().q4q8_gemv
        y = kernel(x2, q, packed["scale"], packed["min"], _group(packed))
    elif x2.shape[0] > PREFILL_ROWS:
        y = F.linear(x2, ext.q4_dequant(q, packed["scale"], packed["min"], _group(packed), False))
    else:
        y = (native512() or ext).q4_linear(x2, q, packed["scale"], packed["min"], _group(packed))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def float_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ bias) for float weights. Up to PREFILL_ROWS fp32 rows (decode, speculative
    verification) through `f32_linear`, whose every row is computed alike whatever the row count (MKL's
    gemv and gemm round differently), so verifying 1 + k tokens gives the logits decoding would, bit for
    bit; larger steps through F.linear."""
    w = w.to(x.dtype)
    ext = native() if x.device.type == "cpu" else None      # (not built at all for a model on a GPU)
    x2 = x.reshape(-1, x.shape[-1])
    if ext is None or x.dtype != torch.float32 or x2.shape[0] > PREFILL_ROWS or x2.shape[0] == 0:
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    y = ext.f32_linear(x2, w)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def grouped_ok(stacked: dict[str, torch.Tensor]) -> bool:
    """Whether `qlinear_experts` can take these stacked int4 expert weights."""
    q = stacked["q"]
    return native() is not None and q.dtype == torch.uint8 and _native_ok(stacked, q.shape[-1] * 2)


def qlinear_experts(x: torch.Tensor, stacked: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Row t of x times expert ids[t]'s weight, all rows in one call (decode; check `grouped_ok` first).
    x [T, K] fp32 or [1, K] (shared by every row); stacked parts carry a leading expert axis."""
    ext = native512() if _act8_ok(stacked) else None
    kernel = ext.q4q8_moe if ext is not None else (native512() or native()).q4_moe_linear
    return kernel(x.contiguous(), stacked["q"], stacked["scale"], stacked["min"], _group(stacked), ids)


def sorted_experts_ok(stacked: dict[str, torch.Tensor]) -> bool:
    """Whether `qlinear_experts_sorted` can take these stacked int4 expert weights (int8-activation CPUs)."""
    return native512() is not None and _act8_ok(stacked)


def qlinear_experts_sorted(x: torch.Tensor, stacked: dict[str, torch.Tensor], offsets: torch.Tensor) -> torch.Tensor:
    """Prefill's grouped experts: x [T, K] rows sorted by expert, rows offsets[e] .. offsets[e+1]-1 times
    expert e's weight, every used expert in one call (check `sorted_experts_ok` first)."""
    return native512().q4q8_moe_sorted(x.contiguous(), stacked["q"], stacked["scale"], stacked["min"],
                                       _group(stacked), offsets)


def _parts(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t["q"], t["scale"], t["min"]]


def fused_ok(parts: list[dict[str, torch.Tensor]]) -> bool:
    """Whether the fused decode calls (moe_decode, multi_linear, the layer plan) take these quantized weights:
    int4 for the int8-activation kernels, mins stored in fp32, one group size."""
    return all(_act8_ok(t) and "min" in t and t["min"].dtype == torch.float32 for t in parts) \
        and len({_group(t) for t in parts}) <= 1


def moe_decode(x: torch.Tensor, router: torch.Tensor, top_k: int, stacked, packed, shared_gate: torch.Tensor):
    """The sparse-MoE block of a decode-sized step in one native call (csrc/qkernels512.cpp moe_decode; check
    `fused_ok` on its weights first). x [N, H] fp32 -> (out [N, H], expert ids [N, k], weights [N, k])."""
    gate_up, down = stacked
    s_gate, s_up, s_down = packed
    return native512().moe_decode(x.contiguous(), router.contiguous(), top_k, _parts(gate_up), _parts(down),
                                  _parts(s_gate), _parts(s_up), _parts(s_down), shared_gate.contiguous(),
                                  _group(gate_up))


def multi_linear(x: torch.Tensor, weights: list) -> list[torch.Tensor] | None:
    """x [M, K] times several weights in one native call (csrc/qkernels512.cpp multi_linear): each weight a
    quantized dict (int4 for the int8-activation kernels, mins stored) or an fp32 [N, K] tensor. The same
    values as qlinear / float_linear one by one; None where the call cannot take them (then run those)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or not 0 < x.shape[0] <= PREFILL_ROWS:
        return None
    q4 = [w for w in weights if isinstance(w, dict)]
    f32 = [w for w in weights if not isinstance(w, dict)]
    if not q4 or not fused_ok(q4) or any(w["q"].dim() != 2 for w in q4) \
            or not all(w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous() for w in f32) \
            or native() is None:
        return None
    outs = native512().multi_linear(x.contiguous(), [_parts(w) for w in q4], f32, _group(q4[0]))
    it_q, it_f = iter(outs[:len(q4)]), iter(outs[len(q4):])
    return [next(it_q) if isinstance(w, dict) else next(it_f) for w in weights]
