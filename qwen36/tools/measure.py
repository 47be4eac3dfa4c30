"""How the benchmarks measure: the weight bytes a decoded token reads, decode rate from token timestamps, the
machine's memory read bandwidth (a GPU's copy bandwidth), peak RSS, and a wall-clock timer."""
from __future__ import annotations

import resource
import time

import torch

from .. import hugepages
from ..layers.quant import QuantExperts, QuantLinear


def timed(fn):
    """(fn(), seconds it took)."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def decode_rate(stamps: list[float]) -> float:
    """Tokens per second between the first new token and the last (prefill excluded, timed apart)."""
    return round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def memory_bandwidth_gbs(size_bytes: int = 1 << 30, reps: int = 5) -> float:
    """Read bandwidth with torch's threads: sum over a buffer larger than every cache, in huge-page memory
    where the machine gives it, as the weights are (hugepages.py): the fastest read the machine allows."""
    x = hugepages.empty((size_bytes // 4,), torch.float32) if hugepages.enabled() else torch.empty(size_bytes // 4)
    x.fill_(1.0)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return size_bytes / best / 1e9


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timestamp means the work is done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbs(device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes read plus written per second by a device-to-device copy (the GPU's usable memory bandwidth)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    synchronize(device)
    return 2 * nbytes * reps / (time.perf_counter() - t) / 1e9


def weight_bytes_per_token(model, batch: int = 1) -> int:
    """Bytes of weights a decode step reads per token: everything but the unused experts and the
    embedding table (one row)."""
    total = 0
    cfg = model.cfg
    for name, module in model.named_modules():
        if name == "embed_tokens":
            total += module.weight[0].numel() * module.weight.element_size()
            continue
        if isinstance(module, QuantExperts) or name.endswith("mlp.experts"):
            per_expert = _module_bytes(module) // cfg.num_experts
            used = min(cfg.num_experts, cfg.num_experts_per_tok * batch)   # upper bound for batch > 1
            total += per_expert * used
            continue
        total += _module_bytes(module)          # its own parameters (a layer's A_log, dt_bias too)
    return total // batch


def _module_bytes(module) -> int:
    if isinstance(module, (QuantLinear, QuantExperts)):
        parts = module.parts() if isinstance(module, QuantLinear) else {
            f"{a}{k}": v for a in ("gate_up_proj", "down_proj") for k, v in module.parts(a).items()}
        extra = sum(p.numel() * p.element_size() for p in module.parameters())
        return sum(t.numel() * t.element_size() for t in parts.values()) + extra
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
