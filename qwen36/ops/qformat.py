"""The stored formats of quantized weights (int8, int4): config, quantize, dequantize, nibble packing, shapes.

Formats (what `qwen36 quantize` writes and the loader reads; W is a [N out, K in] weight):
  int8: q int8 [N, K], scale fp32 [N]                      w = q * scale          (symmetric, per row)
  int4: q uint8 [N, K/2] (two 4-bit codes a byte, order in `pack_nibbles`), scale and min fp32
        [N, K/G] per group of G along K                    w = code * scale + min (asymmetric)
Experts keep a leading expert axis on every tensor (`StackedQuant`). A quantized weight is a dict of these
parts; the kernels (ops/linear.py, ops/moe.py) read it as it is stored, and `dequantize` is the reference
every kernel is tested against. This module depends on torch only: everything above it reads the format.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


class StackedQuant:
    """One quantized weight per expert, stored stacked (leading expert axis); [e] is expert e's parts."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors["q"].shape[0]

    def __getitem__(self, e: int) -> dict[str, torch.Tensor]:
        return {k: v[e] for k, v in self.tensors.items()}


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


def quantized_shapes(shape: tuple[int, ...], cfg: QuantConfig) -> dict[str, tuple[int, ...]]:
    """The on-disk parts of a quantized weight of `shape` ([..., N, K])."""
    *lead, N, K = shape
    if cfg.method == "int8":
        return {".q": (*lead, N, K), ".scale": (*lead, N)}
    groups = K // group_for(K, cfg.group_size)
    return {".q": (*lead, N, K // 2), ".scale": (*lead, N, groups), ".min": (*lead, N, groups)}


def in_width(t: dict[str, torch.Tensor]) -> int:
    """K, the input width of a quantized weight."""
    q = t["q"]
    return q.shape[-1] * (1 if q.dtype == torch.int8 else 2)


def group_of(t: dict[str, torch.Tensor]) -> int:
    """The group size of an int4 weight as stored (K over the number of scales per row)."""
    return t["q"].shape[-1] * 2 // t["scale"].shape[-1]
