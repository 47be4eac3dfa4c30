"""Weights in anonymous memory backed by transparent huge pages (CPU decode reads them at full bandwidth).

Why: a decode step streams every dense weight and each chosen expert once, and the read rate depends on
where the bytes live: the same kernel reads the int4 output head about 1.4x faster from huge pages than from
ordinary memory, and the checkpoint's file mapping is slower still or as fast, by the page cache's history
(`python scripts/hugepage_read.py`; figures in docs/performance.md).

A 4 KiB page costs a TLB miss and a page walk every 4 KiB of a streaming read; a 2 MiB page, every 2 MiB.
Linux gives huge pages to anonymous memory that asks (madvise) when THP is "madvise" (the usual default)
or to any aligned anonymous memory when it is "always". A file mapping is as fast as the page cache's
folios are large: slow when the file's pages were in the cache as written (small pages), fast after they
were evicted and read back (large folios); which one a user gets depends on the machine's history, so the
weights are copied.

`place_weights` copies the weights into one such region (an arena) once, after loading. It leaves
alone: the embedding table (one row is read per token), and experts that must stay in their file mapping
(`max_ram`: residency.py drops their pages). It moves nothing when the copies would not fit in the
memory the kernel reports available (MemAvailable) less a margin, or when the kernel refuses the mapping:
then the weights stay as loaded.
QWEN36_HUGEPAGES=0 (ComputeConfig.hugepages) turns it off: place_weights follows the model's backend, the
caches (`zeros`) the environment's config.
"""
from __future__ import annotations

import ctypes
import mmap

import torch
from torch import nn

from .checkpoint import MAPPINGS
from .layers.quant import QuantExperts, QuantLinear
from .ops.backend import ComputeConfig
from .residency import locate

HUGE = 2 << 20                 # the x86 transparent huge page
ALIGN = 64                     # each weight starts on a cache line
MARGIN = 1 << 30               # memory left free for caches, activations and the rest of the process


def enabled(compute: ComputeConfig | None = None) -> bool:
    """Whether huge-page memory is asked for (`compute`, None: the environment's config) and Linux offers it."""
    return (compute or ComputeConfig.from_env()).hugepages and hasattr(mmap, "MADV_HUGEPAGE")


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in its own anonymous mapping, 2 MiB aligned, advised to use huge pages.
    Its memory is returned when the tensor (and every view of it) is gone."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    size = -(-nbytes // HUGE) * HUGE
    mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = _address(mm)
    offset = -start % HUGE                       # the first 2 MiB boundary inside the mapping
    mm.madvise(mmap.MADV_HUGEPAGE, offset, size)
    buf = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)   # keeps `mm` alive
    return buf.view(dtype).view(shape)


def zeros(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.zeros for caches: on the CPU (when enabled) in huge-page memory, whose pages the kernel fills
    with zeros when first touched, so untouched rows take no memory."""
    if torch.device(device).type != "cpu" or not enabled():
        return torch.zeros(shape, dtype=dtype, device=device)
    try:
        return empty(shape, dtype)
    except (OSError, ValueError):                # no such mapping to be had: ordinary memory
        return torch.zeros(shape, dtype=dtype, device=device)


def _address(mm: mmap.mmap) -> int:
    obj = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(obj)
    finally:
        del obj                                  # release the export, or the mapping could never close


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (free memory plus what the kernel can reclaim), or None."""
    return meminfo("MemAvailable")


def meminfo(key: str) -> int | None:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable, ...), or None."""
    return proc_kb("/proc/meminfo", key)


def proc_kb(path: str, key: str) -> int | None:
    """A "Key:  N kB" field of a /proc file (meminfo, PID/status) in bytes, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _weights(model: nn.Module, experts: bool):
    """(owner, key, tensor) for every weight place_weights may move: parameters of any module, the parts of
    quantized linears and, with experts=True, of quantized experts."""
    for name, module in model.named_modules():
        if name.endswith("embed_tokens"):
            continue
        for key, p in module.named_parameters(recurse=False):
            if "experts" in name and not experts:
                continue
            yield module._parameters, key, p
        if isinstance(module, QuantLinear) and module.packed is not None:
            for key, t in module.packed.items():
                yield module.packed, key, t
        if isinstance(module, QuantExperts) and experts:
            for stacked in (module.gate_up_proj, module.down_proj):
                if stacked is not None:
                    for key, t in stacked.tensors.items():
                        yield stacked.tensors, key, t


def place_weights(model: nn.Module, experts: bool = True) -> int:
    """Copy the model's CPU weights into one huge-page arena (see the module text), each at a 64-byte
    boundary. experts=False leaves routed experts in place; when all of them would not fit, only the other
    weights move. Returns the bytes moved (0 when the model's backend has huge pages off, or short of memory)."""
    if not model.backend.hugepages:
        return 0
    for with_experts in ((True, False) if experts else (False,)):
        todo = [(owner, key, t) for owner, key, t in _weights(model, with_experts) if t.device.type == "cpu"]
        if todo and _fits(todo):
            offsets, total = [], 0
            for _, _, t in todo:
                offsets.append(total)
                total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
            try:
                arena = empty((total,), torch.uint8)
            except (OSError, ValueError):            # the kernel refused the mapping: weights stay as loaded
                return 0
            bases = _mapping_bases()
            for (owner, key, t), at in zip(todo, offsets):
                n = t.numel() * t.element_size()
                new = arena[at:at + n].view(t.dtype).view(t.shape)
                new.copy_(t)
                owner[key] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
                _drop_pages(bases, t.data_ptr(), n)
            return total
    return 0


def _mapping_bases():
    return [(_address(mm), len(mm), mm) for mm in MAPPINGS]


def release(t: torch.Tensor) -> None:
    """A tensor read in place from the checkpoint and no longer needed (quantized into another form): its pages
    leave this process, so a load that quantizes 70 GB of bf16 does not hold them all as resident memory."""
    if t.device.type == "cpu" and t.numel():
        _drop_pages(_mapping_bases(), t.data_ptr(), t.numel() * t.element_size())


def _drop_pages(bases, ptr: int, nbytes: int) -> None:
    """A copied weight's pages of the checkpoint's file mapping leave this process (they stay in the page
    cache, reclaimable; if anything reads them again they come back from it): resident memory counts the
    copy once, not twice, from the first weight on."""
    where = locate(bases, ptr, nbytes)
    if where is not None:
        mm, start, length = where
        mm.madvise(mmap.MADV_DONTNEED, start, length)


def _fits(todo) -> bool:
    """Whether the copies fit: a copy of a file-mapped tensor adds its size (its page-cache pages, counted
    as available, become reclaimable), a copy of an anonymous one only while both exist (one at a time)."""
    avail = available_bytes()
    if avail is None:
        return False
    ranges = [(a, n) for a, n, _ in _mapping_bases()]
    sizes = [(t.numel() * t.element_size(), any(a <= t.data_ptr() < a + n for a, n in ranges)) for _, _, t in todo]
    mapped = sum(n for n, m in sizes if m)
    largest = max((n for n, m in sizes if not m), default=0)
    return mapped + largest + MARGIN <= avail
