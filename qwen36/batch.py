"""ForwardBatch: everything one model step needs to know about its sequences, passed down explicitly.

The step's tokens are flattened: sequence i owns tokens [cu[i], cu[i+1]) of the N tokens. Sequence i
lives in cache slot `slots[i]`, already holds `starts[i]` tokens there, and adds `lens[i]` new ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ForwardBatch:
    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lens: tuple[int, ...]
    positions: torch.Tensor            # [3, N] int64 mRoPE (T, H, W) position of every new token
    logits_index: torch.Tensor         # [M] int64: rows of the N tokens whose logits are wanted
    cu: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        cu = [0]
        for n in self.lens:
            cu.append(cu[-1] + n)
        object.__setattr__(self, "cu", tuple(cu))

    @property
    def num_tokens(self) -> int:
        return self.cu[-1]

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token: recurrent layers can run all sequences at once."""
        return all(n == 1 for n in self.lens)

    @staticmethod
    def text(slots, starts, lens, all_logits: bool = False, device="cpu") -> "ForwardBatch":
        """Plain text: T = H = W = absolute position. Logits for every token or the last of each sequence."""
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
        cu = torch.tensor(lens).cumsum(0)
        idx = torch.arange(int(cu[-1])) if all_logits else cu - 1
        return ForwardBatch(tuple(slots), tuple(starts), tuple(lens), pos.expand(3, -1).to(device), idx.to(device))
