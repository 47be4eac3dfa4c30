"""Who runs in the next step, and with how many tokens. Pure Python: no tensors, no model.

Policy (continuous batching):
  * every running sequence that has finished its prompt decodes one token;
  * sequences still prefilling get prompt chunks from what is left of the step's token budget, oldest first;
  * waiting sequences are admitted in arrival order while a state slot is free and the KV blocks for
    their whole prompt + max_tokens can be reserved. Reserving up front means a running sequence never
    runs out of blocks, so nothing is ever preempted; a request that does not fit waits in the queue.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free_blocks):
            return None
        return [self.free_blocks.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self.free_blocks.extend(reversed(blocks))


@dataclass
class SeqState:
    """The scheduler's view of one sequence."""
    seq_id: int
    prompt_len: int
    max_tokens: int
    num_tokens: int = 0          # tokens known (prompt + generated so far)
    num_computed: int = 0        # tokens already in the cache
    slot: int = -1
    blocks: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.num_tokens = self.prompt_len

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prompt_len


@dataclass(frozen=True)
class Scheduled:
    seq: SeqState
    num_new: int                 # tokens to run this step
    samples: bool                # the step ends at the sequence's last known token: sample a new one


class Scheduler:
    def __init__(self, num_slots: int, num_blocks: int, block_size: int, token_budget: int, max_model_len: int):
        self.block_size, self.token_budget, self.max_model_len = block_size, token_budget, max_model_len
        self.num_blocks = num_blocks
        self.blocks = BlockAllocator(num_blocks)
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []

    def blocks_needed(self, seq: SeqState) -> int:
        return math.ceil((seq.prompt_len + seq.max_tokens) / self.block_size)

    def check(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never run (too long for the model or for the whole cache), or None."""
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            return (f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the maximum "
                    f"context length of {self.max_model_len} tokens")
        if math.ceil(total / self.block_size) > self.num_blocks:
            return (f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) needs more KV cache than the "
                    f"server has ({self.num_blocks * self.block_size} tokens)")
        return None

    def add(self, seq: SeqState) -> None:
        why = self.check(seq.prompt_len, seq.max_tokens)
        if why:
            raise ValueError(why)
        self.waiting.append(seq)

    def finish(self, seq: SeqState) -> None:
        """Release the sequence's slot and blocks (finished, aborted, or failed)."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq.blocks)
            self.free_slots.append(seq.slot)
            seq.blocks, seq.slot = [], -1
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _admit(self) -> list[SeqState]:
        admitted = []
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            blocks = self.blocks.allocate(self.blocks_needed(seq))
            if blocks is None:
                break                                        # keep arrival order: no overtaking
            self.waiting.popleft()
            seq.blocks, seq.slot = blocks, self.free_slots.pop()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def schedule(self) -> tuple[list[Scheduled], list[SeqState]]:
        """The next step's work, and the sequences newly given a slot (their state must be reset)."""
        admitted = self._admit()
        budget = self.token_budget
        work = []
        for seq in self.running:                             # decodes first: one token each
            if not seq.prefilling and seq.num_computed < seq.num_tokens:
                work.append(Scheduled(seq, 1, True))
                budget -= 1
        for seq in self.running:                             # then prompt chunks, oldest first
            if seq.prefilling and budget > 0:
                n = min(seq.prompt_len - seq.num_computed, budget)
                work.append(Scheduled(seq, n, seq.num_computed + n == seq.prompt_len))
                budget -= n
        return work, admitted
