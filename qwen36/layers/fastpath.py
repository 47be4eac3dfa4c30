"""A decoder layer's decode step as a fixed sequence of native calls, where every piece of the layer allows it.

The module path (model.DecoderLayer.forward: norm, mixer and MoE modules) computes the same values with the
same kernels; on a decode step it also spends, between kernels, what the modules do around them (dispatch,
per-call checks, argument lists). A decode step moves ~37 MB of weights per layer at the real widths, and the
time between two kernels is time in which nothing streams. The plan holds each kernel's arguments, built
once per layer, and runs (csrc: qkernels.cpp, qkernels512.cpp):

  linear attention:  rms_norm -> multi_linear (qkv, z, a, b) -> delta_decode -> q4q8_gemv (out_proj)
  full attention:    rms_norm -> multi_linear (q, k, v) -> gated_attention_short -> q4q8_gemv (o_proj)
  both:              + residual -> rms_norm -> moe_decode -> + residual

It applies to decode steps (one token per sequence, no speculative rows), int4 weights for the int8-activation
kernels, fp32 activations on the CPU, and nothing watching expert use (`max_ram`); elsewhere `plan_for`
returns None and the module path runs. tests/test_decode_fused.py compares the two bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..batch import ForwardBatch
from ..kernels import PREFILL_ROWS
from . import moe as moe_mod
from .deltanet import _EMPTY

FUSED_LAYERS = True                    # tests and measurements switch the plan off to compare


def _q4(module: nn.Module) -> list[torch.Tensor] | None:
    """A QuantLinear's stored parts for the int8-activation kernels, or None."""
    packed = getattr(module, "packed", None)
    if packed is None or getattr(module, "bias", None) is not None or not kernels.fused_ok([packed]):
        return None
    return kernels._parts(packed)


def _f32(module: nn.Module) -> torch.Tensor | None:
    w = getattr(module, "weight", None)
    ok = isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.is_contiguous() and module.bias is None
    return w if ok else None


class DecodePlan:
    """One layer's decode step as native calls (see the module text). Built by `plan_for`."""

    def __init__(self, layer: nn.Module, tensors: list[torch.Tensor], norms, attn, delta, moe_args):
        self.layer = layer
        self.tensors = tensors                         # everything the plan reads: a weight replaced -> rebuilt
        self.key = self._key(tensors)
        self.norms, self.attn, self.delta, self.moe_args = norms, attn, delta, moe_args
        self.top_k = moe_args[1]

    @staticmethod
    def _key(tensors) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in tensors)

    def applies(self, x: torch.Tensor, batch: ForwardBatch) -> bool:
        return (x.dtype == torch.float32 and x.device.type == "cpu" and batch.is_decode and not batch.keep
                and x.shape[0] <= min(PREFILL_ROWS, moe_mod.GROUPED_ROWS // self.top_k)
                and getattr(self.layer.mlp.experts, "on_use", None) is None and kernels.act8())

    def __call__(self, x, rope, batch: ForwardBatch, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        ext, e5 = kernels.native(), kernels.native512()
        (n1, n2, eps), layer = self.norms, self.layer
        h = ext.rms_norm(x, n1, eps)
        B = x.shape[0]
        if self.attn is not None:
            q4, gs, qw, kw, a_eps, out, (n_q, n_kv, d, scale) = self.attn
            q, k, v = e5.multi_linear(h, q4, [], gs)
            rows, rcu, tcu = batch.kv_rows_flat
            y = ext.gated_attention_short(q.view(B, n_q, 2 * d), k.view(B, n_kv, d), v.view(B, n_kv, d), qw, kw, a_eps,
                                          rope[0], rope[1], cache["k"], cache["v"], rows, rcu, tcu, scale)
            h = e5.q4q8_gemv(y, *out, gs)
        else:
            q4, f32, gs, (conv_w, A_log, dt_bias, norm_w, norm_eps), out, dims = self.delta
            m, z, a, b = e5.multi_linear(h, q4, f32, gs)
            y = ext.delta_decode(m.view(B, 1, -1), a.view(B, 1, -1), b.view(B, 1, -1), cache["conv"], conv_w,
                                 batch.slot_tensor, A_log, dt_bias, _EMPTY, batch.keep_tensor, cache["state"], _EMPTY,
                                 z, norm_w, norm_eps, *dims)
            layer.linear_attn.capture_decode(cache, batch)
            h = e5.q4q8_gemv(y, *out, gs)
        x = x + h
        return x + e5.moe_decode(ext.rms_norm(x, n2, eps), *self.moe_args)[0]


def plan_for(layer: nn.Module) -> DecodePlan | None:
    """The layer's decode plan, built at first use and again whenever one of its weights was replaced; None
    where the layer's weights or this CPU do not allow one."""
    cached = layer.__dict__.get("_plan", False)
    if cached is None or not FUSED_LAYERS or not moe_mod.FUSED or not kernels.act8():
        return None
    if cached is not False and cached.key == DecodePlan._key(cached.tensors):
        return cached
    plan = _build(layer)
    layer.__dict__["_plan"] = plan
    return plan


def _build(layer: nn.Module) -> DecodePlan | None:
    if kernels.native() is None or kernels.native512() is None:
        return None
    n1, n2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
    mlp = layer.mlp
    e, s = mlp.experts, mlp.shared_expert
    if n1.dtype != torch.float32 or n2.dtype != torch.float32 or not hasattr(e, "grouped") \
            or _f32(mlp.gate) is None or _f32(mlp.shared_expert_gate) is None:
        return None
    stacked = [e.gate_up_proj.tensors, e.down_proj.tensors]
    shared = [_q4(s.gate_proj), _q4(s.up_proj), _q4(s.down_proj)]
    if any(p is None for p in shared) or not kernels.fused_ok([*stacked, s.gate_proj.packed]):
        return None
    gs = kernels._group(stacked[0])
    moe_args = (mlp.gate.weight, mlp.top_k, kernels._parts(stacked[0]), kernels._parts(stacked[1]), *shared,
                mlp.shared_expert_gate.weight, gs)
    tensors = [n1, n2, mlp.gate.weight, mlp.shared_expert_gate.weight, *moe_args[2], *moe_args[3],
               *(t for p in shared for t in p)]
    attn = delta = None
    if layer.full_attention:
        a = layer.self_attn
        q4 = [_q4(a.q_proj), _q4(a.k_proj), _q4(a.v_proj)]
        out = _q4(a.o_proj)
        if any(p is None for p in (*q4, out)) or len({kernels._group(a.q_proj.packed),
                                                     kernels._group(a.o_proj.packed), gs}) != 1:
            return None
        qw, kw = a._norm_weights()
        attn = (q4, gs, qw, kw, a.q_norm.eps, out, (a.n_q, a.n_kv, a.d, a.scale))
        tensors += [*(t for p in q4 for t in p), *out, a.q_norm.weight, a.k_norm.weight]
    else:
        d = layer.linear_attn
        q4 = [_q4(d.in_proj_qkv), _q4(d.in_proj_z)]
        f32 = [_f32(d.in_proj_a), _f32(d.in_proj_b)]
        out = _q4(d.out_proj)
        if any(p is None for p in (*q4, *f32, out)) or len({kernels._group(d.in_proj_qkv.packed),
                                                             kernels._group(d.out_proj.packed), gs}) != 1:
            return None
        small = (d.conv1d.weight, d.A_log, d.dt_bias, d.norm.weight)
        consts = (*d.small_weights(), d.norm.eps)
        delta = (q4, f32, gs, consts, out, (d.n_k, d.d_k, d.d_v))
        tensors += [*(t for p in q4 for t in p), *f32, *out, *small]
    return DecodePlan(layer, tensors, (n1, n2, layer.input_layernorm.eps), attn, delta, moe_args)
