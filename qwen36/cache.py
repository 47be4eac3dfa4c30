"""Hybrid cache: plain preallocated tensors.

  attention layers: k, v   [num_blocks * block_size, Hkv, D]   KV rows in fixed-size blocks (the KV dtype:
                                                                 the compute dtype, fp32, bf16 or int8)
                    k_scale, v_scale [rows, Hkv] fp32           int8 only: per-token, per-head scales
  DeltaNet layers:  conv   [slots, W-1, conv_dim]               last W-1 pre-conv inputs (compute dtype)
                    state  [slots, Hv, Dk, Dv]                  recurrent state (fp32, as the reference keeps it)
A sequence owns one state slot and a list of KV blocks (its block table). The layout is declared by the
model (`TextModel.cache_layout`); this file only allocates and resets.
"""
from __future__ import annotations

import math

import torch

from . import hugepages
from .batch import ForwardBatch

# name -> (shape, dtype or None for the compute dtype); "per_token" tensors get num_blocks*block_size rows,
# "per_slot" tensors get one row per sequence slot.
Layout = dict[int, dict[str, tuple[str, tuple[int, ...], torch.dtype | None]]]

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
KV_NAMES = ("k", "v", "k_scale", "v_scale")       # an attention layer's per-token rows


def kv_storage(name: str | None, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype KV rows are stored in for EngineConfig.kv_cache_dtype `name` ("auto" or None: the compute
    dtype). int8 rows come with per-token, per-head fp32 scales (symmetric absmax/127, ops/attention.py)."""
    if name in (None, "auto"):
        return compute_dtype
    if name not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(KV_DTYPES)}; got {name!r}")
    return KV_DTYPES[name]


def kv_layout(shape: tuple[int, int], dtype: torch.dtype | None) -> dict:
    """An attention layer's layout entries: k, v [Hkv, D] rows in `dtype` (None: the compute dtype), and
    their scales [Hkv] where the rows are int8."""
    kv = ("per_token", shape, dtype)
    entries = {"k": kv, "v": kv}
    if dtype == torch.int8:
        entries |= {"k_scale": ("per_token", shape[:1], torch.float32),
                    "v_scale": ("per_token", shape[:1], torch.float32)}
    return entries


class HybridCache:
    def __init__(self, layout: Layout, num_slots: int, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.num_slots, self.num_blocks, self.block_size = num_slots, num_blocks, block_size
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        for layer, tensors in layout.items():
            self.layers[layer] = {}
            for name, (kind, shape, own_dtype) in tensors.items():
                rows = num_blocks * block_size if kind == "per_token" else num_slots
                self.layers[layer][name] = hugepages.zeros((rows, *shape), own_dtype or dtype, device)

    @classmethod
    def contiguous(cls, layout: Layout, num_slots: int, max_len: int, dtype, device, block_size: int = 64):
        """Every slot owns a fixed run of blocks (see `table`): for offline use without a scheduler."""
        per_slot = math.ceil(max_len / block_size)
        cache = cls(layout, num_slots, num_slots * per_slot, block_size, dtype, device)
        cache.blocks_per_slot = per_slot
        return cache

    def table(self, slot: int) -> list[int]:
        """The block table of `slot` in a cache made by `contiguous`."""
        n = self.blocks_per_slot
        return list(range(slot * n, (slot + 1) * n))

    def batch(self, slots, starts, lens, logits="last", positions=None) -> ForwardBatch:
        """A ForwardBatch over slots of a `contiguous` cache."""
        device = next(iter(next(iter(self.layers.values())).values())).device
        return ForwardBatch.build(slots, starts, lens, [self.table(s) for s in slots], self.block_size, logits,
                                  positions, device)

    def __getitem__(self, layer: int) -> dict[str, torch.Tensor]:
        return self.layers[layer]

    def reset(self, slot: int) -> None:
        """Start a new sequence in `slot`: recurrent and conv states to zero (KV rows are overwritten)."""
        for tensors in self.layers.values():
            for name in ("conv", "state"):
                if name in tensors:
                    tensors[name][slot].zero_()

    def bytes_per_slot(self) -> int:
        """The DeltaNet conv and recurrent states (and any other per-slot rows) of one sequence slot."""
        return sum(t[0].numel() * t.element_size()
                   for tensors in self.layers.values() for name, t in tensors.items() if name not in KV_NAMES)

    def bytes_per_block(self) -> int:
        """The KV rows of one block over all attention layers, their scales included (int8)."""
        return sum(t[: self.block_size].numel() * t.element_size()
                   for tensors in self.layers.values() for name, t in tensors.items() if name in KV_NAMES)


class SnapshotStore:
    """Saved prefix states for the prefix cache, one row per snapshot slot:

      DeltaNet layers:  conv [S, W-1, C], state [S, Hv, Dk, Dv] (fp32)     the recurrent state at position P
      attention layers: k, v [S, block_size - 1, Hkv, D]                   KV rows of the partial last block
                        (int8: k_scale, v_scale [S, block_size - 1, Hkv], their scales)
      MTP head (when speculating): its k, v tail as above, and hidden [S, H] (the state at position P - 1)
    Allocated untouched (hugepages.zeros): pages are touched (and count in resident memory) only once a slot is written.
    A DeltaNet layer's rows are also in its cache dict as "snap_conv" / "snap_state", so the layer can write a
    state reached in the middle of a prefill chunk (ForwardBatch.captures).
    """

    def __init__(self, cache: HybridCache, num_slots: int):
        self.cache, self.num_slots = cache, num_slots
        B = cache.block_size
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        for layer, tensors in cache.layers.items():
            self.layers[layer] = {}
            for name, t in list(tensors.items()):
                if name not in STATE_NAMES:
                    continue
                rows = (B - 1,) if name in KV_NAMES else ()
                self.layers[layer][name] = hugepages.zeros((num_slots, *rows, *t.shape[1:]), t.dtype, t.device)
                if name in ("conv", "state"):
                    tensors["snap_" + name] = self.layers[layer][name]

    @staticmethod
    def bytes_per_slot(cache: HybridCache) -> int:
        B = cache.block_size
        return sum((B - 1 if name in KV_NAMES else 1) * t[0].numel() * t.element_size()
                   for tensors in cache.layers.values() for name, t in tensors.items() if name in STATE_NAMES)

    def save(self, snap: int, slot: int, tail_rows: torch.Tensor) -> None:
        """Copy sequence slot `slot`'s states and its KV rows `tail_rows` (< block_size of them) into `snap`."""
        self._copy(snap, slot, tail_rows, to_store=True)

    def save_tail(self, snap: int, tail_rows: torch.Tensor) -> None:
        """Only the KV rows (the states were written by the layers during the step)."""
        self._copy(snap, None, tail_rows, to_store=True)

    def restore(self, snap: int, slot: int, tail_rows: torch.Tensor) -> None:
        """The reverse of `save`: states into sequence slot `slot`, the KV tail into rows `tail_rows`."""
        self._copy(snap, slot, tail_rows, to_store=False)

    def _copy(self, snap: int, slot: int | None, tail_rows: torch.Tensor, to_store: bool) -> None:
        n = len(tail_rows)
        for layer, tensors in self.cache.layers.items():
            for name, stored_all in self.layers[layer].items():
                kv = name in KV_NAMES
                if not kv and slot is None:
                    continue
                t = tensors[name]
                stored = stored_all[snap, :n] if kv else stored_all[snap]                  # a view
                where = tail_rows if kv else slot
                if to_store:
                    stored.copy_(t[where])
                else:
                    t[where] = stored


STATE_NAMES = ("k", "v", "k_scale", "v_scale", "conv", "state", "hidden")     # "hidden": the MTP head's per-slot input (mtp.py)
