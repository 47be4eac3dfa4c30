"""Who runs in the next step, and with how many tokens. Pure Python: no tensors, no model.

Policy (continuous batching):
  * every running sequence that has finished its prompt decodes one token (plus its speculative drafts, which
    the same step verifies);
  * sequences still prefilling get prompt chunks from what is left of the step's token budget, oldest first;
  * waiting sequences are admitted in arrival order while a state slot is free and the KV blocks for their
    prompt and the next step can be had (plus one block of headroom per running sequence);
  * KV blocks are reserved as a sequence grows, a block at a time, not for prompt + max_tokens up front: a
    request without max_tokens (which may run to the end of the context) holds only what it has written,
    so it does not keep short requests waiting behind it;
  * when a running sequence needs a block and none is free (prefix-cache blocks are evicted first), the
    newest running sequence is preempted: its slot and blocks are freed and it goes back to the head of the
    queue with everything it has generated as its prompt, to be recomputed when it is admitted again
    (vLLM's recompute preemption; the sampled tokens stay, so the output does not change).
A request whose prompt + max_tokens is more than the whole cache can hold is refused when it is added.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .blocks import BlockAllocator
from .prefix_cache import PrefixCache, PrefixKey, Snapshot


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
    key: PrefixKey | None = None         # prompt tokens + media, to look up in the prefix cache (None: no reuse)
    snap_points: tuple[int, ...] = ()    # prompt positions where the engine snapshots the state
    background: bool = False             # an idle-time prefill: admitted only when nothing else waits or runs
    cached: int = 0                      # prompt tokens taken from the prefix cache
    restore: Snapshot | None = None      # copy this snapshot into the slot before the first step
    drafts: list[int] = field(default_factory=list)   # speculative tokens to verify after the next one
    mtp_rows: int = 1                    # the MTP head's KV rows 1 .. mtp_rows - 1 are written (mtp.py)
    preemptions: int = 0                 # times this sequence was preempted (and recomputed)

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
    def __init__(self, max_num_seqs: int, num_blocks: int, block_size: int, max_num_batched_tokens: int,
                 max_model_len: int, snapshot_slots: int = 0, background_chunk: int = 128, lookahead: int = 1):
        self.block_size, self.max_model_len = block_size, max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens    # tokens per step
        self.num_blocks, self.background_chunk = num_blocks, background_chunk
        self.busy_prefill = max(16, max_num_batched_tokens // 4)   # prompt tokens per step while others decode
        self.lookahead = lookahead            # KV rows a step may write past a sequence's known tokens
        self.num_preemptions = 0
        self.blocks = BlockAllocator(num_blocks)
        self.prefix = PrefixCache(self.blocks, block_size, snapshot_slots) if snapshot_slots > 0 else None
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []

    @property
    def num_available(self) -> int:
        """KV blocks no request holds: free, or kept only by the prefix cache (evicted when needed)."""
        return self.blocks.num_free + (self.prefix.cached_only_blocks if self.prefix is not None else 0)

    def blocks_needed(self, seq: SeqState) -> int:
        """Blocks seq must hold before its next step: its known tokens and the rows the step may write past
        them, never more than prompt + max_tokens."""
        return math.ceil(min(seq.prompt_len + seq.max_tokens, seq.num_tokens + self.lookahead) / self.block_size)

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
        if seq.restore is not None:                          # admitted, never ran: unpin its snapshot
            seq.restore.pins -= 1
            seq.restore = None
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq.blocks)
            self.free_slots.append(seq.slot)
            seq.blocks, seq.slot = [], -1
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _next_waiting(self) -> SeqState | None:
        if not self.waiting:
            return None
        seq = self.waiting[0]
        if seq.background:   # background work only when nothing else runs or waits
            if any(not s.background for s in self.running) or any(not s.background for s in self.waiting):
                return next((s for s in self.waiting if not s.background), None)
        return seq

    def _admit(self) -> list[SeqState]:
        admitted = []
        while self.free_slots:
            seq = self._next_waiting()
            if seq is None:
                break
            hit = self.prefix.lookup(seq.key) if self.prefix is not None and seq.key is not None else None
            shared = hit.blocks if hit else []
            need = self.blocks_needed(seq) - len(shared)
            if not self._room(need + len(self.running), hit):   # headroom: each running one's next block
                break                                        # keep arrival order: no overtaking
            self.waiting.remove(seq)
            self.blocks.ref(shared)
            seq.blocks, seq.slot = shared + self.blocks.allocate(need), self.free_slots.pop()
            if hit:
                seq.num_computed = seq.cached = seq.mtp_rows = hit.pos
                seq.restore = hit.snapshot
                hit.snapshot.pins += 1                       # the engine unpins it once copied
                self.prefix.stats.hits += 1
                self.prefix.stats.tokens_reused += hit.pos
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _room(self, n: int, hit=None) -> bool:
        """Whether n blocks are free, evicting prefix-cache blocks if needed."""
        return self.blocks.num_free >= n or (
            self.prefix is not None and self.prefix.make_room(n, [hit.snapshot] if hit else []))

    def _grow(self) -> None:
        """Give every running sequence the blocks its next step needs, oldest first; where none are left,
        preempt the newest running sequence (possibly the one growing) and try again."""
        for seq in list(self.running):
            while seq in self.running and len(seq.blocks) < (need := self.blocks_needed(seq)):
                if self._room(need - len(seq.blocks)):
                    seq.blocks += self.blocks.allocate(need - len(seq.blocks))
                else:
                    self.preempt(self.running[-1])

    def preempt(self, seq: SeqState) -> None:
        """Free seq's slot and blocks and put it back at the head of the queue; what it has generated
        becomes part of its prompt, recomputed when it is admitted again (max_tokens shrinks to match)."""
        self.finish(seq)
        seq.max_tokens -= seq.num_tokens - seq.prompt_len
        seq.prompt_len = seq.num_tokens
        seq.num_computed = seq.cached = 0
        seq.drafts, seq.mtp_rows = [], 1
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> tuple[list[Scheduled], list[SeqState]]:
        """The next step's work, and the sequences newly given a slot (their state must be reset)."""
        self._grow()
        admitted = self._admit()
        budget = self.max_num_batched_tokens
        work = []
        decoding = False
        for seq in self.running:                             # decodes first: one token each
            if not seq.prefilling and seq.num_computed < seq.num_tokens:
                work.append(Scheduled(seq, 1 + len(seq.drafts), True))
                budget -= 1 + len(seq.drafts)
                decoding |= not seq.background
        if decoding:            # someone waits for each step's token: keep the step short (vLLM's long-prefill
            budget = min(budget, self.busy_prefill)           # threshold does the same); a lone prompt gets all
        # then prompt chunks, the fewest tokens left first (oldest first among equals; background prefill last):
        # a short prompt is not held behind a long one's chunks (an agent's tool turn behind a 50k-token
        # prompt, or a chat behind a large image); a long one still gets whatever budget the short leave
        prefilling = sorted((q for q in self.running if q.prefilling),
                            key=lambda q: (q.background, q.prompt_len - q.num_computed))
        for seq in prefilling:
            if budget > 0:
                n = min(seq.prompt_len - seq.num_computed, budget, self.background_chunk if seq.background else budget)
                work.append(Scheduled(seq, n, seq.num_computed + n == seq.prompt_len and not seq.background))
                budget -= n
        return work, admitted
