"""`max_ram`: keep the process's resident memory under a limit by letting experts go out of memory.

Stored quantized weights are used in place from their file mapping, so an expert that is not resident
is simply re-read (from the page cache, or the disk) the next time it is used. Before each MoE layer
runs, while the resident set is over the limit, the pages of the least recently used experts (of any
layer, never those about to run) are dropped (madvise DONTNEED). Dense weights, the output head and the
caches stay resident.
"""
from __future__ import annotations

import ctypes
import mmap

import torch

from .checkpoint import MAPPINGS
from .layers.quant import QuantExperts

PAGE = mmap.PAGESIZE


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class ExpertResidency:
    def __init__(self, model, limit_bytes: int):
        self.limit = limit_bytes
        bases = [(ctypes.addressof(ctypes.c_char.from_buffer(mm)), len(mm), mm) for mm in MAPPINGS]
        self.ranges: dict[tuple[int, int], list[tuple[mmap.mmap, int, int]]] = {}
        self.last_used: dict[tuple[int, int], int] = {}
        self.resident: set[tuple[int, int]] = set()          # used since last dropped
        self.step = 0
        for layer, module in enumerate(m for m in model.modules() if isinstance(m, QuantExperts)):
            module.on_use = lambda ids, layer=layer: self.touch(layer, ids)
            for stacked in (module.gate_up_proj, module.down_proj):
                for t in stacked.tensors.values():
                    per = t[0].numel() * t.element_size()
                    for e in range(t.shape[0]):
                        where = locate(bases, t.data_ptr() + e * per, per)
                        if where is not None:
                            self.ranges.setdefault((layer, e), []).append(where)
                            self.last_used.setdefault((layer, e), -1)
        if not self.ranges:
            raise ValueError("max_ram needs experts stored quantized in the checkpoint (qwen36 quantize / "
                             "make-demo --geometry real): only memory-mapped experts can leave memory")

    def touch(self, layer: int, ids: torch.Tensor) -> None:
        """A MoE layer is about to run `ids`: mark them, then make room from other experts."""
        self.step += 1
        for e in ids.unique().tolist():
            self.last_used[(layer, e)] = self.step
            self.resident.add((layer, e))
        self.enforce()

    def enforce(self) -> None:
        """Drop least recently used experts until the resident set is under the limit."""
        over = resident_bytes() - self.limit
        if over <= 0:
            return
        for key in sorted(self.resident, key=self.last_used.get):
            if over <= 0 or self.last_used[key] == self.step:     # never the experts about to run
                break
            for mm, start, length in self.ranges[key]:
                mm.madvise(mmap.MADV_DONTNEED, start, length)
                over -= length
            self.resident.discard(key)


def locate(bases, ptr: int, size: int):
    """(mapping, page-aligned offset, length) of the bytes [ptr, ptr+size) inside a file mapping."""
    for base, length, mm in bases:
        if base <= ptr and ptr + size <= base + length:
            start = (ptr - base) // PAGE * PAGE
            end = min(length, -(-(ptr - base + size) // PAGE) * PAGE)
            return mm, start, end - start
    return None
