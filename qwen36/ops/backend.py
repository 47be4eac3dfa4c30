"""Which compute path a model takes: `ComputeConfig` (what is asked for) and `Backend` (what runs), decided once.

`ComputeConfig.from_env()` is the one place the compute environment variables are read (each one turns a
path off, to compare or work around it; they are defaults for a config given in code):

  QWEN36_NO_NATIVE=1   no native CPU kernels: every op takes its tensor-op form (what a GPU runs)
  QWEN36_NO_AVX512=1   the AVX2 kernels only (no AVX-512 build)
  QWEN36_ACT8=0        int4 weights keep fp32 activations (no int8-rounded ones; docs/quantization.md)
  QWEN36_DENORMALS=1   denormal floats are not flushed to zero
  QWEN36_FUSED=0       no fused decode calls (the MoE block in one call, and so no layer decode plans)
  QWEN36_FLA=0         no fla-core Triton kernels for a GPU's prefill
  QWEN36_HUGEPAGES=0   weights and caches stay in ordinary memory (hugepages.py)

`resolve_backend(compute, device)` turns a config into a `Backend` for a model on `device` and this
machine (does the native build load, does the CPU have AVX-512 VNNI, does fla import): the loader does it
once and sets it on the model (`model.backend`); layers pass it to the ops, whose dispatchers pick the
kernel from it and from the shapes at hand.

The guards below keep decode, speculative verification and prefill consistent; they are part of the
routing, not tuning knobs:
  PREFILL_ROWS  up to this many rows a step counts as decode-sized: float linears use the row-count-
                independent `f32_linear` (verifying 1 + k tokens gives decoding's logits bit for bit), norms
                their fused kernels; above it, the tensor ops whose rounding transformers' shares
  GROUPED_ROWS  (token, expert) pairs up to which quantized experts run as one grouped decode call
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from . import native as native_build

PREFILL_ROWS = 64
GROUPED_ROWS = 64


@dataclass(frozen=True)
class ComputeConfig:
    """The compute paths asked for (each on by default; a path the machine cannot run is off anyway)."""
    native: bool = True            # the native CPU kernels
    avx512: bool = True            # their AVX-512 build, where the CPU has AVX-512
    act8: bool = True              # int4 weights times int8-rounded activations, where the CPU has VNNI
    flush_denormals: bool = True   # denormal floats flushed to zero on the threads that compute
    fused_moe: bool = True         # a decode-sized step's MoE block in one native call
    decode_plan: bool = True       # a decode step's layer as a fixed sequence of native calls
    fla: bool = True               # fla-core's Triton kernels for a GPU's prefill
    hugepages: bool = True         # weights (and CPU caches) in huge-page memory

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "ComputeConfig":
        """The defaults, less the paths the environment turns off (the module text lists the variables)."""
        return cls(native=environ.get("QWEN36_NO_NATIVE") != "1", avx512=environ.get("QWEN36_NO_AVX512") != "1",
                   act8=environ.get("QWEN36_ACT8") != "0", flush_denormals=environ.get("QWEN36_DENORMALS") != "1",
                   fused_moe=environ.get("QWEN36_FUSED") != "0",
                   fla=environ.get("QWEN36_FLA") != "0", hugepages=environ.get("QWEN36_HUGEPAGES") != "0")


@dataclass(frozen=True)
class Backend:
    """The routes a model's ops take, resolved once (`resolve_backend`). The op dispatchers still check what
    only the call knows (dtype, device and row count of the tensors, the weights' format)."""
    compute: ComputeConfig
    device: torch.device
    native: Any = field(default=None, repr=False)      # the AVX2 build (ops/native.py), None: tensor ops
    native512: Any = field(default=None, repr=False)   # the AVX-512 build, None where absent or not asked for
    act8: bool = False             # int4 weights may multiply int8-rounded activations (AVX-512 VNNI)
    fused_moe: bool = False        # SparseMoE of a decode-sized step in one call (needs act8)
    decode_plan: bool = False      # layers' decode plans (layers/decode_plan.py; needs fused_moe)
    fla: Any = field(default=None, repr=False)         # fla-core's (chunk, fused recurrent) kernels, or None
    flush_denormals: bool = False
    hugepages: bool = False        # place_weights copies the weights into huge-page memory

    @property
    def int4(self):
        """The build whose fp32-activation int4 kernels run (AVX-512 where present)."""
        return self.native512 or self.native

    def prepare_thread(self) -> bool:
        """What each thread that computes needs once (denormals flushed, where on); returns whether it applies.
        The loader calls it; an engine stepping the model from another thread calls it there."""
        if self.flush_denormals:
            native_build.flush_denormals_on_this_thread(self.native)
        return self.flush_denormals


def resolve_backend(compute: ComputeConfig, device, cpu_kernels: bool | None = None) -> Backend:
    """The backend for a model on `device` on this machine. cpu_kernels: whether the native CPU kernels are
    loaded (default: for a CPU model; a GPU model with experts kept in CPU memory needs them too)."""
    device = torch.device(device)
    if cpu_kernels is None:
        cpu_kernels = device.type == "cpu"
    ext = native_build.load() if compute.native and cpu_kernels else None
    ext512 = native_build.load512() if ext is not None and compute.avx512 else None
    act8 = ext512 is not None and compute.act8 and native_build.has_vnni()
    fused_moe = act8 and compute.fused_moe
    return Backend(compute, device, native=ext, native512=ext512, act8=act8, fused_moe=fused_moe,
                   decode_plan=fused_moe and compute.decode_plan,
                   fla=native_build.load_fla() if compute.fla and device.type == "cuda" else None,
                   flush_denormals=ext is not None and compute.flush_denormals,
                   hugepages=compute.hugepages and hasattr(mmap, "MADV_HUGEPAGE"))


_defaults: dict[str, Backend] = {}


def default_backend(device="cpu") -> Backend:
    """The backend of modules no loader gave one (built by hand, the vision tower): the environment's
    config on this machine, resolved once per device type."""
    kind = torch.device(device).type
    if kind not in _defaults:
        _defaults[kind] = resolve_backend(ComputeConfig.from_env(), kind)
    return _defaults[kind]


class UsesBackend:
    """Mixin of the modules whose forward calls ops: `backend` is the one the loader set on the model
    (TextModel.set_backend), or, for a module built by hand, the environment's default for the device of its
    first parameter (resolved at first use, then kept)."""
    _backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            p = next(self.parameters(), None)
            self._backend = default_backend(p.device if p is not None and p.device.type != "meta" else "cpu")
        return self._backend

    @backend.setter
    def backend(self, backend: Backend) -> None:
        self._backend = backend
