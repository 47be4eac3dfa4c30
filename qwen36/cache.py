"""Hybrid cache: plain preallocated tensors, one slot per running sequence.

  attention layers: k, v   [slots, Hkv, max_len, D]       (compute dtype)
  DeltaNet layers:  conv   [slots, W-1, conv_dim]           (compute dtype; the last W-1 pre-conv inputs)
                    state  [slots, Hv, Dk, Dv]              (fp32 recurrent state, as the reference keeps it)
The layout is declared by the model (`model.cache_layout`); this file only allocates and resets.
"""
from __future__ import annotations

import torch


class HybridCache:
    def __init__(self, layout: dict[int, dict[str, tuple[tuple[int, ...], torch.dtype | None]]],
                 max_seqs: int, max_len: int, dtype: torch.dtype, device):
        self.max_seqs, self.max_len = max_seqs, max_len
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        for layer, tensors in layout.items():
            self.layers[layer] = {}
            for name, (shape, own_dtype) in tensors.items():
                shape = tuple(max_len if s == -1 else s for s in shape)        # -1 marks the sequence axis
                self.layers[layer][name] = torch.zeros((max_seqs, *shape), dtype=own_dtype or dtype, device=device)

    def __getitem__(self, layer: int) -> dict[str, torch.Tensor]:
        return self.layers[layer]

    def reset(self, slot: int) -> None:
        """Start a new sequence in `slot`: recurrent and conv states to zero (KV is overwritten as it grows)."""
        for tensors in self.layers.values():
            for name, t in tensors.items():
                if name in ("conv", "state"):
                    t[slot].zero_()
