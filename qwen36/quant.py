"""Weight-only quantization (int8, int4): formats, quantize / dequantize, and the quantized modules.

Formats (what `qwen36 quantize` writes and the loader reads; W is a [N out, K in] weight):
  int8: q int8 [N, K], scale fp32 [N]                      w = q * scale          (symmetric, per row)
  int4: q uint8 [N, K/2] (two 4-bit codes a byte, order in `pack_nibbles`), scale and min fp32
        [N, K/G] per group of G along K                    w = code * scale + min (asymmetric)
Experts keep a leading expert axis on every tensor.

What stays in high precision, and why: the router (`mlp.gate`: a ranking, small), the shared-expert gate
(one row), DeltaNet's `in_proj_a/b` (feed the decay and beta; tiny), conv1d, A_log, dt_bias, every norm,
and the embedding (one row is read per token, so quantizing it saves memory but no time).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

METHODS = ("int8", "int4")
DEFAULT_GROUP = 128          # the full model fits 21 GB; 64 and 32 are more accurate (docs/quantization.md) but need more


@dataclass(frozen=True)
class QuantConfig:
    method: str                 # "int8" | "int4"
    group_size: int = DEFAULT_GROUP

    def to_json(self) -> dict:
        return {"quant_method": "qwen36", "bits": 8 if self.method == "int8" else 4, "group_size": self.group_size}

    @staticmethod
    def from_json(d: dict) -> "QuantConfig":
        if d.get("quant_method") != "qwen36" or d.get("bits") not in (4, 8):
            raise ValueError(f"config.json quantization_config {d} is not a qwen36 int8/int4 checkpoint; qwen36 reads "
                             "bf16 and block-FP8 (quant_method 'fp8', as Qwen/Qwen3.6-35B-A3B-FP8) checkpoints and "
                             "its own int8/int4 ones, and quantizes at load with quantization='int8'|'int4'")
        return QuantConfig("int8" if d["bits"] == 8 else "int4", int(d.get("group_size", DEFAULT_GROUP)))


# ----------------------------------------------------------------------------------------------- math
def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = w.abs().amax(-1).clamp_min(1e-12) / 127
    return {"q": torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8), "scale": scale}


def group_for(K: int, group: int) -> int:
    """The group size used for an input width K: `group`, or the largest divisor of K below it, preferring
    multiples of 32 (the kernels' block); every real Qwen3.6 width is a multiple of 128."""
    for step in (32, 2):
        for g in range(min(group, K) // step * step, 1, -step):
            if K % g == 0:
                return g
    raise ValueError(f"int4 needs an even input width, got {K}")


def quantize_int4(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    w = w.float()
    *lead, N, K = w.shape
    group = group_for(K, group)
    g = w.reshape(*lead, N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(*lead, N, K)
    return {"q": pack_nibbles(codes), "scale": scale, "min": lo}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., K] (0..15) -> bytes [..., K/2]. K a multiple of 32: in each 32-block, byte j holds
    element j (low nibble) and j + 16 (high), the order the kernels read; otherwise element 2i and 2i+1."""
    K = codes.shape[-1]
    if K % 32:
        return codes[..., 0::2] | (codes[..., 1::2] << 4)
    c = codes.reshape(*codes.shape[:-1], K // 32, 2, 16)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*codes.shape[:-1], K // 2)


def unpack_nibbles(q: torch.Tensor) -> torch.Tensor:
    K = q.shape[-1] * 2
    lo, hi = q & 15, q >> 4
    if K % 32:
        return torch.stack([lo, hi], dim=-1).reshape(*q.shape[:-1], K)
    blocks = lambda t: t.reshape(*q.shape[:-1], K // 32, 1, 16)
    return torch.cat([blocks(lo), blocks(hi)], dim=-2).reshape(*q.shape[:-1], K)


def dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weight a quantized tensor stands for (the reference every kernel is tested against)."""
    q = t["q"]
    if q.dtype == torch.int8:
        return q.float() * t["scale"][..., None]
    codes = unpack_nibbles(q).float()
    *lead, N, K = codes.shape
    G = K // t["scale"].shape[-1]
    g = codes.reshape(*lead, N, K // G, G) * t["scale"][..., None] + t["min"][..., None]
    return g.reshape(*lead, N, K)


def quantize(w: torch.Tensor, cfg: QuantConfig, chunk_bytes: int = 64 << 20) -> dict[str, torch.Tensor]:
    """The parts of w quantized, a slice along the first axis at a time (stacked experts [E, N, K] a few experts,
    a weight [N, K] a block of rows: rows are independent, so the parts are the same). At once, the fp32
    temporaries of the output head or of a layer's experts are 6-8 GB at the real geometry, more than a 24 GB
    machine has beside the model being converted."""
    one = (lambda x: quantize_int8(x)) if cfg.method == "int8" else (lambda x: quantize_int4(x, cfg.group_size))
    per = w[0].numel() * 4 if w.dim() >= 2 else 0
    if per == 0 or w.shape[0] * per <= chunk_bytes:
        return one(w)
    step = max(1, chunk_bytes // per)
    pieces = [one(w[i:i + step]) for i in range(0, w.shape[0], step)]
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


# ----------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """Drop-in for layers.linear.Linear with a quantized weight; bias (if any) stays float."""

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        self.packed = None                                      # kernel-specific layout, set by load()
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load(self, part: str, t: dict[str, torch.Tensor]) -> None:
        self.packed = kernels.pack(t)

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored format (q, scale[, min]) of the weight."""
        return kernels.unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.qlinear(x, self.packed)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class StackedQuant:
    """One quantized weight per expert, stored stacked (leading expert axis); [e] is expert e's parts."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors["q"].shape[0]

    def __getitem__(self, e: int) -> dict[str, torch.Tensor]:
        return {k: v[e] for k, v in self.tensors.items()}


class QuantExperts(nn.Module):
    """Drop-in for layers.moe.Experts: gate_up [E, 2I, H] and down [E, H, I], quantized per expert."""
    linear = staticmethod(lambda x, packed: kernels.qlinear(x, packed))
    prefill_linear = staticmethod(lambda x, packed: kernels.qlinear(x, packed, prefill=True))

    def __init__(self, n: int, hidden: int, inter: int, cfg: QuantConfig):
        super().__init__()
        self.n, self.hidden, self.inter, self.cfg = n, hidden, inter, cfg
        self.gate_up_proj: StackedQuant | None = None
        self.down_proj: StackedQuant | None = None
        self.on_use = None                                   # residency.py: told which experts ran
        self.offloaded = False                               # in CPU memory for a model elsewhere (offload_experts)

    def load(self, name: str, t: dict[str, torch.Tensor]) -> None:
        setattr(self, name, StackedQuant(kernels.pack(t)))

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        return kernels.unpack(getattr(self, name).tensors)

    def grouped(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        """Decode: every (token, chosen expert) pair in two kernel calls, no loop over experts.
        x [N, H], ids / w [N, k]; None where the grouped kernel is unavailable."""
        if x.dtype != torch.float32 or x.device.type != "cpu" \
                or not (kernels.grouped_ok(self.gate_up_proj.tensors)
                                            and kernels.grouped_ok(self.down_proj.tensors)):
            return None
        N, k = ids.shape
        rows = ids.reshape(-1)
        gu = kernels.qlinear_experts(x if N == 1 else x.repeat_interleave(k, 0), self.gate_up_proj.tensors, rows)
        g, u = gu.chunk(2, dim=-1)
        y = kernels.qlinear_experts(F.silu(g) * u, self.down_proj.tensors, rows)          # [N*k, H]
        return (y.view(N, k, -1) * w.view(N, k, 1).to(y.dtype)).sum(1)


    def sorted_prefill(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        """Prefill: the (token, chosen expert) pairs sorted by expert, each used expert's weights read once
        for all its rows, in two kernel calls (no loop over experts); None where the kernel is unavailable.
        Sums in the same order as ops.moe.moe (pairs by expert, stably)."""
        if x.dtype != torch.float32 or x.device.type != "cpu" \
                or not (kernels.sorted_experts_ok(self.gate_up_proj.tensors)
                                            and kernels.sorted_experts_ok(self.down_proj.tensors)):
            return None
        N, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        offsets = torch.zeros(self.n + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(flat, minlength=self.n).cumsum(0)
        token = order // k
        gu = kernels.qlinear_experts_sorted(x[token], self.gate_up_proj.tensors, offsets)
        g, u = gu.chunk(2, dim=-1)
        y = kernels.qlinear_experts_sorted(F.silu(g) * u, self.down_proj.tensors, offsets)      # [N*k, H]
        return torch.zeros_like(x).index_add_(0, token, y * w.reshape(-1)[order, None].to(y.dtype))


# Which weights are quantized: every projection of the decoder and the output head. Kept float: the
# router, shared-expert gate, DeltaNet in_proj_a/b, conv, norms, embedding (reasons at the top).
QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj",
                     "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")


def is_quantized(name: str) -> bool:
    """Whether the weight `name` (our naming) is stored quantized."""
    base = name.rsplit(".", 1)[0]
    return (name == "lm_head.weight" or name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
            or (name.endswith(".weight") and base.endswith(QUANTIZED_LINEARS)))


def quantize_modules(model: nn.Module, cfg: QuantConfig) -> dict[str, tuple[nn.Module, str]]:
    """Swap the model's quantizable modules for quantized ones (a pass over an unchanged model).
    Returns weight name -> (module that loads it, part name)."""
    from .layers.linear import Linear
    from .layers.moe import Experts

    targets = {}
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, Linear) and is_quantized(f"{name}.weight"):
            q = QuantLinear(module.weight.shape[1], module.weight.shape[0], cfg, module.bias is not None)
            setattr(parent, child, q)
            targets[f"{name}.weight"] = (q, "weight")
        elif isinstance(module, Experts):
            E, two_i, H = module.gate_up_proj.shape
            q = QuantExperts(E, H, two_i // 2, cfg)
            setattr(parent, child, q)
            targets[f"{name}.gate_up_proj"] = (q, "gate_up_proj")
            targets[f"{name}.down_proj"] = (q, "down_proj")
    return targets


def offload_experts(model: nn.Module, layers, cfg: QuantConfig) -> dict[str, tuple[nn.Module, str]]:
    """--cpu-experts (llama.cpp's --n-cpu-moe): the routed experts of `layers` become quantized experts in CPU
    memory, run by the CPU kernels, while the rest of the model is on its device; the MoE block sends them
    its activations and takes their sum back (layers/moe.py). Returns weight name -> (module, part)."""
    targets = {}
    for i in layers:
        mlp = model.layers[i].mlp
        E, two_i, H = mlp.experts.gate_up_proj.shape
        mlp.experts = QuantExperts(E, H, two_i // 2, cfg)
        mlp.experts.offloaded = True
        for part in ("gate_up_proj", "down_proj"):
            targets[f"layers.{i}.mlp.experts.{part}"] = (mlp.experts, part)
    return targets


def quantized_shapes(shape: tuple[int, ...], cfg: QuantConfig) -> dict[str, tuple[int, ...]]:
    """The on-disk parts of a quantized weight of `shape` ([..., N, K])."""
    *lead, N, K = shape
    if cfg.method == "int8":
        return {".q": (*lead, N, K), ".scale": (*lead, N)}
    groups = K // group_for(K, cfg.group_size)
    return {".q": (*lead, N, K // 2), ".scale": (*lead, N, groups), ".min": (*lead, N, groups)}
