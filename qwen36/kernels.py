"""Moved: the native kernels' loader is ops/native.py, the compute path a model takes ops/backend.py
(`ComputeConfig`, `Backend`), and each op's dispatcher sits beside its reference in ops/ (linear, moe, norm,
attention, gated_delta). These names are kept until importers are re-pointed; they use the environment's
default backend (ops.backend.default_backend), as these functions always did."""
from __future__ import annotations

from .ops import linear as _linear, moe as _moe
from .ops.backend import PREFILL_ROWS, default_backend  # noqa: F401
from .ops.linear import qlinear_act8_reference, qlinear_reference, quantize_activations  # noqa: F401


# moved to ops/native.py + ops/backend.py; kept until importers are re-pointed
def native():
    return default_backend().native


def native512():
    return default_backend().native512


def act8() -> bool:
    return default_backend().act8


def flush_denormals() -> bool:
    # moved to Backend.prepare_thread (model.backend.prepare_thread()); kept until importers are re-pointed
    return default_backend().prepare_thread()


def qlinear(x, packed, prefill=None):
    # moved to ops.linear.qlinear(x, packed, backend, prefill); kept until importers are re-pointed
    return _linear.qlinear(x, packed, default_backend(), prefill)


def float_linear(x, w, bias=None):
    # moved to ops.linear.float_linear(x, w, backend, bias); kept until importers are re-pointed
    return _linear.float_linear(x, w, default_backend(), bias)


def moe_decode(x, router, top_k, stacked, packed, shared_gate):
    # moved to ops.moe.moe_decode(..., backend); kept until importers are re-pointed
    return _moe.moe_decode(x, router, top_k, stacked, packed, shared_gate, default_backend())
