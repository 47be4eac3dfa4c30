"""ForwardBatch: everything one model step needs to know about its sequences, passed down explicitly.

The step's tokens are flattened: sequence i owns tokens [cu[i], cu[i+1]) of the N tokens. Sequence i keeps
its DeltaNet state in slot `slots[i]`, already has `starts[i]` tokens in the cache and adds `lens[i]`.
Attention KV lives in fixed-size blocks; `kv_rows[i]` lists the flat cache rows of its positions
0 .. starts[i] + lens[i] - 1 (row = block * block_size + offset), the last lens[i] of which are written.
`captures[i]` lists (k, snapshot slot): after its first k new tokens (1 <= k <= lens[i]), sequence i's
DeltaNet states are also written to that prefix-cache snapshot slot (the engine copies the KV tail).
`keep[i]` (speculative verification): the DeltaNet states after each of sequence i's first keep[i] new tokens
are also written to its slot's "spec_conv" / "spec_state" rows, where the engine resumes after a rejection.
"""
from __future__ import annotations

import itertools
from functools import cached_property
from dataclasses import dataclass, field
from typing import Sequence

import torch


# sequences adding at most this many tokens in a step (decode, speculative verification) run token by token
# where the arithmetic could otherwise depend on the count (DeltaNet recurrence, attention): verifying 1 + k
# tokens then computes exactly what decoding them one at a time would
SHORT = 8


def text_positions(start: int, n: int) -> torch.Tensor:
    """[3, n] mRoPE positions of plain text tokens start .. start+n-1: T = H = W = the index."""
    return torch.arange(start, start + n).expand(3, -1)


@dataclass(frozen=True)
class ForwardBatch:
    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lens: tuple[int, ...]
    positions: torch.Tensor            # [3, N] int64 mRoPE (T, H, W) position of every new token
    logits_index: torch.Tensor         # [M] int64: rows of the N tokens whose logits are wanted
    kv_rows: tuple[torch.Tensor, ...]  # per sequence: [starts[i] + lens[i]] int64 KV-cache rows
    captures: tuple[tuple[tuple[int, int], ...], ...] = ()   # per sequence: (k, snapshot slot), k ascending
    keep: tuple[int, ...] = ()         # per sequence: intermediate DeltaNet states to keep (empty: none)
    cu: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        cu = [0]
        for n in self.lens:
            cu.append(cu[-1] + n)
        object.__setattr__(self, "cu", tuple(cu))

    @property
    def num_tokens(self) -> int:
        return self.cu[-1]

    @cached_property
    def slot_tensor(self) -> torch.Tensor:
        """slots as an int64 tensor (made once per step, not once per layer)."""
        return torch.tensor(self.slots, dtype=torch.long, device=self.positions.device)

    @cached_property
    def keep_tensor(self) -> torch.Tensor:
        """keep as an int64 CPU tensor (zeros when empty)."""
        return torch.tensor(self.keep or [0] * len(self.slots), dtype=torch.long)

    @cached_property
    def kv_rows_flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(every sequence's KV rows concatenated, their offsets [B+1], the tokens' offsets [B+1]), int64:
        what the native attention of short chunks takes (layers/attention.py)."""
        return self.kv_rows_of(range(len(self.slots)))

    def kv_rows_of(self, members) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """kv_rows_flat for some of the sequences."""
        rows = [self.kv_rows[i] for i in members]
        rcu = torch.tensor([0, *itertools.accumulate(len(r) for r in rows)], dtype=torch.long)
        tcu = torch.tensor([0, *itertools.accumulate(self.lens[i] for i in members)], dtype=torch.long)
        return (torch.cat(rows) if len(rows) > 1 else rows[0]), rcu, tcu

    @cached_property
    def kv_table(self) -> torch.Tensor:
        """[B, max(starts + lens)] int64: each sequence's KV rows (kv_rows) padded with row 0, for attention of
        every sequence in one call (ops.attention.decode_attention; kv_lens says how many are real)."""
        return torch.nn.utils.rnn.pad_sequence(list(self.kv_rows), batch_first=True)

    @cached_property
    def kv_lens(self) -> torch.Tensor:
        """[B] int64: how many KV rows each sequence has (starts + lens) on the batch's device."""
        return torch.tensor([len(r) for r in self.kv_rows], dtype=torch.long, device=self.positions.device)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token: recurrent layers can run all sequences at once."""
        return all(n == 1 for n in self.lens)

    @staticmethod
    def build(slots: Sequence[int], starts: Sequence[int], lens: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int, logits: str | Sequence[int] = "last",
              positions: torch.Tensor | None = None, device="cpu",
              captures: Sequence[Sequence[tuple[int, int]]] = (), keep: Sequence[int] = (),
              first_row: int = 0) -> "ForwardBatch":
        """logits: "last" (last new token of each sequence), "all", or explicit row indices.
        positions default to plain text positions (T = H = W = absolute index). first_row: KV rows of
        positions below it are left out (the MTP head's row 0 is never used)."""
        if positions is None:
            positions = torch.cat([text_positions(s, n) for s, n in zip(starts, lens)], dim=1)
        cu = torch.tensor([0, *lens]).cumsum(0)
        if logits == "last":
            idx = cu[1:] - 1
        elif logits == "all":
            idx = torch.arange(int(cu[-1]))
        else:
            idx = torch.tensor(list(logits), dtype=torch.long)
        rows = []
        for s, n, table in zip(starts, lens, block_tables):
            p = torch.arange(first_row, s + n)
            rows.append((torch.tensor(list(table), dtype=torch.long)[p // block_size] * block_size
                         + p % block_size).to(device))
        return ForwardBatch(tuple(slots), tuple(starts), tuple(lens), positions.to(device), idx.to(device), tuple(rows),
                            tuple(tuple(c) for c in captures), tuple(keep) if any(keep) else ())
