"""The native CPU kernels (csrc/): built on first use, loaded once, and what this CPU can run.

Also fla-core's Triton kernels for the gated delta rule (`load_fla`), where installed.

Two builds with torch's cpp_extension, into the cache directory (about a minute each, once):
  qkernels.cpp     AVX2/FMA: int8/int4 weights read as stored (never expanded to fp32), the row-count-
                   independent fp32 GEMV, and the decode glue (norms, DeltaNet prep and recurrence, short
                   attention)
  qkernels512.cpp  the int4 ones again for AVX-512 CPUs, and, where the CPU has AVX-512 VNNI, int4 weights
                   times int8-rounded activations plus the fused decode calls (multi_linear, moe_decode)
Why our own: on a small CPU PyTorch's int4 op needs bf16 activations and its fp32 path is far below memory
bandwidth (measurements in docs/performance.md). This module only builds and loads them: whether a model
uses them is its backend's decision (ops/backend.py), and each op's dispatcher (ops/linear.py, ops/moe.py,
ops/norm.py, ops/attention.py, ops/gated_delta.py) calls them beside its reference.
"""
from __future__ import annotations

import fcntl
import hashlib
import sys
import threading
import warnings
from pathlib import Path

import torch

from ..paths import cache_dir

_ext = None                      # the AVX2 build, False if it could not be built
_ext512 = None                   # the AVX-512 build of the int4 kernels, False if none
_vnni = None                     # whether that build may run its AVX-512 VNNI kernels (checked once)
_fla = None                      # fla-core's Triton kernels (chunk, fused recurrent), False when not installed
_thread = threading.local()      # per thread: whether denormals were flushed there


def _build(name: str, source: str, flags: list[str]):
    from torch.utils.cpp_extension import load     # (imports a compiler toolchain helper: only when building)

    csrc = Path(__file__).parent.parent / "csrc"
    # the sources, the shared header and their place in the directory name: any change builds afresh (torch's
    # own check looks at the .cpp files only), and two installs (or checkouts) never rebuild each other's
    digest = hashlib.sha1(str(csrc.resolve()).encode()
                          + b"".join(f.read_bytes() for f in sorted(csrc.iterdir()) if f.suffix in (".cpp", ".h")))
    build = cache_dir() / "build" / f"{name}-torch{torch.__version__}-{digest.hexdigest()[:10]}"
    build.mkdir(parents=True, exist_ok=True)
    if not (build / f"{name}.so").exists():
        print(f"qwen36: compiling {source} into {build} (once, about a minute) ...", file=sys.stderr, flush=True)
    # one build at a time, under a lock the OS releases when its holder dies: torch's own lock file stays
    # behind when a build is interrupted (Ctrl-C during the first start), and every later start would wait on
    # it forever; holding ours, any such file is stale
    with open(build / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        return load(name=name, sources=[str(csrc / source)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", *flags],
                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)


def load():
    """The AVX2 kernels, building them on first use; None where unavailable (not Linux, no AVX2, no
    compiler: the reference paths still work)."""
    global _ext
    if _ext is None:
        _ext = False
        if sys.platform.startswith("linux") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            try:
                _ext = _build("qwen36_qkernels", "qkernels.cpp", [])
            except Exception as e:  # noqa: BLE001 - no compiler etc.: the reference path still works
                warnings.warn(f"qwen36: quantized kernels could not be built ({e}); using the slow reference path")
                _ext = False
    return _ext or None


def load512():
    """The AVX-512 int4 kernels where the CPU has AVX-512 and the AVX2 build works; else None."""
    global _ext512
    if _ext512 is None:
        _ext512 = False
        if load() is not None and torch.backends.cpu.get_cpu_capability() == "AVX512":
            try:
                _ext512 = _build("qwen36_qkernels512", "qkernels512.cpp",
                                 ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"])
            except Exception as e:  # noqa: BLE001 - the AVX2 kernels still work
                warnings.warn(f"qwen36: AVX-512 kernels could not be built ({e}); using the AVX2 ones")
                _ext512 = False
    return _ext512 or None


def has_vnni() -> bool:
    """Whether the AVX-512 build loads and this CPU runs its VNNI (int8 dot product) kernels."""
    global _vnni
    if _vnni is None:
        ext = load512()
        _vnni = ext is not None and bool(ext.has_vnni())
    return _vnni


def flush_denormals_on_this_thread(ext) -> None:
    """Flush denormal floats to zero (x86: FTZ + DAZ) on the calling thread and the compute threads it runs
    on: DeltaNet's decays underflow into denormals, each ~100x slower to compute with (a prefill chunk of the
    delta rule ran several times slower with them). Values below 1.2e-38 become 0 (the model's outputs do
    not move measurably). The setting is per thread and so is OpenMP's team of a thread: done once per
    thread (Backend.prepare_thread)."""
    if getattr(_thread, "flushed", False):
        return
    torch.set_flush_denormal(True)
    ext.flush_denormals(True)
    _thread.flushed = True


def load_fla():
    """(chunk_gated_delta_rule, fused_recurrent_gated_delta_rule) from fla-core (`pip install 'qwen36[cuda]'`,
    a GPU's prefill) where it imports; else None."""
    global _fla
    if _fla is None:
        _fla = False
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
            _fla = (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule)
        except Exception:  # noqa: BLE001 - not installed, or no Triton for this platform
            _fla = False
    return _fla or None
