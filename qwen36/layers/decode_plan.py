"""A decoder layer's decode step as a fixed sequence of native calls, where every piece of the layer allows it.

The module path (model.DecoderLayer.forward: norm, mixer and MoE modules) computes the same values with the
same kernels; on a decode step it also spends, between kernels, what the modules do around them (dispatch,
per-call checks, argument lists). A decode step moves ~37 MB of weights per layer at the real widths, and the
time between two kernels is time in which nothing streams. The plan holds each kernel's arguments, which it
asks the layer's modules for once (`decode_args()`), and runs (csrc: qkernels.cpp, qkernels512.cpp):

  linear attention:  rms_norm -> multi_linear (qkv, z, a, b) -> delta_decode -> q4q8_gemv (out_proj)
  full attention:    rms_norm -> multi_linear (q, k, v) -> gated_attention_short -> q4q8_gemv (o_proj)
  both:              + residual -> rms_norm -> moe_decode -> + residual

It applies where the backend has decode plans on (int8-activation CPUs, the fused MoE call on), to decode
steps (one token per sequence, no speculative rows), int4 weights for the int8-activation kernels, fp32
activations on the CPU, and nothing watching expert use (`max_ram`); elsewhere `plan_for` returns None and the
module path runs. tests/test_decode_fused.py compares the two bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from ..batch import ForwardBatch
from ..ops.attention import gated_attention_short
from ..ops.backend import GROUPED_ROWS, PREFILL_ROWS, Backend
from ..ops.gated_delta import EMPTY
from ..ops.linear import kernel_args
from ..ops.qformat import group_of
from .linear import f32_weight, int4_parts


class DecodePlan:
    """One layer's decode step as native calls (see the module text). Built by `plan_for`."""

    def __init__(self, layer: nn.Module, backend: Backend, watched: list[torch.Tensor], norms, attn, delta, moe_args):
        self.layer, self.backend = layer, backend
        self.watched = watched                         # everything the plan reads: a weight replaced -> rebuilt
        self.key = self._key(watched)
        self.norms, self.attn, self.delta, self.moe_args = norms, attn, delta, moe_args
        self.top_k = moe_args[1]

    @staticmethod
    def _key(tensors) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in tensors)

    def current(self) -> bool:
        return self.key == self._key(self.watched)

    def applies(self, x: torch.Tensor, batch: ForwardBatch) -> bool:
        return (x.dtype == torch.float32 and x.device.type == "cpu" and batch.is_decode and not batch.keep
                and x.shape[0] <= min(PREFILL_ROWS, GROUPED_ROWS // self.top_k)
                and self.layer.mlp.experts.on_use is None)

    def __call__(self, x, rope, batch: ForwardBatch, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        ext, e5 = self.backend.native, self.backend.native512
        (n1, n2, eps), layer = self.norms, self.layer
        h = ext.rms_norm(x, n1, eps)
        B = x.shape[0]
        if self.attn is not None:
            a = self.attn
            n_q, n_kv, d, scale = a.dims
            q, k, v = e5.multi_linear(h, a.qkv, [], a.group)
            rows, rcu, tcu = batch.kv_rows_flat
            y = gated_attention_short(q.view(B, n_q, 2 * d), k.view(B, n_kv, d), v.view(B, n_kv, d), a.q_norm,
                                      a.k_norm, a.eps, rope[0], rope[1], cache, rows, rcu, tcu, scale, self.backend)
            h = e5.q4q8_gemv(y, *a.out, a.group)
        else:
            dn = self.delta
            conv_w, A_log, dt_bias, norm_w = dn.small
            m, z, a, b = e5.multi_linear(h, dn.in_q4, dn.in_f32, dn.group)
            y = ext.delta_decode(m.view(B, 1, -1), a.view(B, 1, -1), b.view(B, 1, -1), cache["conv"], conv_w,
                                 batch.slot_tensor, A_log, dt_bias, EMPTY, batch.keep_tensor, cache["state"], EMPTY,
                                 z, norm_w, dn.eps, *dn.dims)
            layer.linear_attn.capture_decode(cache, batch)
            h = e5.q4q8_gemv(y, *dn.out, dn.group)
        x = x + h
        return x + e5.moe_decode(ext.rms_norm(x, n2, eps), *self.moe_args)[0]


def plan_for(layer: nn.Module, backend: Backend) -> DecodePlan | None:
    """The layer's decode plan, built at first use and again whenever one of its weights was replaced (or the
    backend changed); None where the backend or the layer's weights do not allow one."""
    if not backend.decode_plan:
        return None
    cached = layer.decode_plan
    if cached is not None and cached[0] is backend and (cached[1] is None or cached[1].current()):
        return cached[1]
    plan = _build(layer, backend)
    layer.decode_plan = (backend, plan)
    return plan


def _build(layer: nn.Module, backend: Backend) -> DecodePlan | None:
    n1, n2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
    mlp = layer.mlp
    if backend.native is None or backend.native512 is None or n1.dtype != torch.float32 or n2.dtype != torch.float32:
        return None
    moe = mlp.decode_args()
    if moe is None or f32_weight(mlp.gate) is None or f32_weight(mlp.shared_expert_gate) is None \
            or any(int4_parts(m) is None for m in mlp.shared_expert.children()):
        return None
    router, top_k, stacked, shared, shared_gate = moe
    gs = group_of(stacked[0])
    moe_args = (router, top_k, *(kernel_args(t) for t in (*stacked, *shared)), shared_gate, gs)
    watched = [n1, n2, router, shared_gate, *(t for p in moe_args[2:7] for t in p)]
    attn = delta = None
    if layer.full_attention:
        attn = layer.self_attn.decode_args()
        if attn is None or attn.group != gs:
            return None
        watched += attn.watched
    else:
        delta = layer.linear_attn.decode_args()
        if delta is None or delta.group != gs:
            return None
        watched += delta.watched
    return DecodePlan(layer, backend, watched, (n1, n2, layer.input_layernorm.eps), attn, delta, moe_args)
