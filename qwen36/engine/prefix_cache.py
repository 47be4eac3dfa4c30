"""Prefix cache policy: which cached prefix a new request can start from. Pure Python: no tensors, no model.

A Gated DeltaNet layer cannot resume from KV alone, so a reusable prefix is a *snapshot*: at position P the
DeltaNet conv + recurrent states (stored by `cache.SnapshotStore` in one of its slots) plus the attention KV
of positions 0 .. P-1. That KV is split into
  * full blocks 0 .. P//B - 1: shared by content. Block j's key is a hash chain over the tokens (and media
    digests) of blocks 0..j; the cache holds a reference on each, and a full block is never written again;
  * the tail P//B*B .. P-1 (< B rows): copied into the snapshot slot with the states.
A request starts from the deepest snapshot whose tokens are a prefix of its prompt (and strictly shorter
than it: the last prompt token must run to give logits), takes references on its full blocks, copies the
tail and the states into its own block and slot, and prefills only the rest.

Snapshots are evicted least recently used first; a hit refreshes the snapshot it uses and the message-start
snapshots on the path to it (where a later request that changes history diverges), not the superseded ends
of earlier turns. One a request is about to restore is pinned. Evicting a snapshot drops its block references; a block no snapshot
and no running request holds goes back to the free pool. The memory bound is the number of snapshot slots.
"""
from __future__ import annotations

import hashlib
import itertools
from array import array
from dataclasses import dataclass, field
from typing import Sequence

from .blocks import BlockAllocator

ROOT = b"qwen36-prefix-v1"


@dataclass(frozen=True)
class PrefixKey:
    """What a cached prefix must match: token ids, the media (start, end, digest) spans among them, and the
    cache salt (vLLM's `cache_salt`: prefixes are shared only between requests with the same salt, so one
    tenant cannot learn from cached_tokens what another sent)."""
    ids: tuple[int, ...]
    media: tuple[tuple[int, int, str], ...] = ()
    salt: str = ""
    # the hash chain per block size, computed once per key (a cache, not part of the key's value)
    _chain: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def chain(self, block_size: int):
        """Yield (j, key of blocks 0..j-1) for j = 0, 1, ...: the hash chain over full blocks, each hash
        computed once per key (lookups, `has` and `add` walk the same prompt several times)."""
        root = ROOT if not self.salt else hashlib.blake2b(ROOT + self.salt.encode(), digest_size=16).digest()
        hashes = self._chain.setdefault(block_size, [root])
        yield 0, root
        for j in range(len(self.ids) // block_size):
            if j + 1 == len(hashes):
                hashes.append(_digest(hashes[j], self, j * block_size, (j + 1) * block_size))
            yield j + 1, hashes[j + 1]

    def media_in(self, a: int, b: int) -> tuple[str, ...]:
        return tuple(d for s, e, d in self.media if s < b and e > a)


def _digest(prev: bytes, key: PrefixKey, a: int, b: int) -> bytes:
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(array("q", key.ids[a:b]).tobytes())
    for d in key.media_in(a, b):
        h.update(d.encode())
    return h.digest()


@dataclass
class Snapshot:
    slot: int                          # the SnapshotStore slot holding states + KV tail
    pos: int                           # tokens covered
    group: bytes                       # hash chain of its full blocks
    tail: tuple[int, ...]              # tokens pos//B*B .. pos-1
    tail_media: tuple[str, ...]
    blocks: list[int]                  # its full KV blocks (the cache holds one reference on each)
    boundary: bool = False             # at a message start: kept fresh while a later snapshot is in use
    last_used: int = 0
    pins: int = 0


@dataclass(frozen=True)
class Hit:
    snapshot: Snapshot
    pos: int
    blocks: list[int]                  # full blocks to share (caller takes its own references)


@dataclass
class CacheStats:
    hits: int = 0
    tokens_reused: int = 0
    snapshots_saved: int = 0
    evictions: int = 0


class PrefixCache:
    def __init__(self, blocks: BlockAllocator, block_size: int, num_slots: int):
        self.blocks, self.block_size = blocks, block_size
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.num_slots = num_slots
        self.groups: dict[bytes, list[Snapshot]] = {}
        self.by_hash: dict[bytes, int] = {}          # chain key of blocks 0..j -> the cached block j
        self.cache_refs: dict[int, int] = {}         # block -> snapshots holding it
        self.hash_of: dict[int, bytes] = {}
        self.clock = itertools.count(1)
        self.stats = CacheStats()

    # ------------------------------------------------------------------ lookup
    def lookup(self, key: PrefixKey) -> Hit | None:
        """The deepest snapshot that is a strict prefix of key.ids; refreshes every snapshot on its path."""
        B, n = self.block_size, len(key.ids)
        path: list[Snapshot] = []
        for j, h in key.chain(B):
            for snap in self.groups.get(h, ()):
                if snap.pos < n and key.ids[j * B:snap.pos] == snap.tail and \
                        key.media_in(j * B, snap.pos) == snap.tail_media:
                    path.append(snap)
            if j * B >= n or (j > 0 and h not in self.by_hash):
                break                                # no deeper snapshot can exist: its blocks would be here
        if not path:
            return None
        path.sort(key=lambda s: s.pos)
        best = path[-1]
        for s in path:                               # ends of earlier turns age: a deeper one supersedes them
            if s.boundary or s is best:
                s.last_used = next(self.clock)
        return Hit(best, best.pos, list(best.blocks))

    # ------------------------------------------------------------------ adding
    def has(self, key: PrefixKey, pos: int) -> bool:
        B = self.block_size
        j = pos // B
        h = next(itertools.islice(key.chain(B), j, None))[1]
        return any(s.pos == pos and s.tail == key.ids[j * B:pos] and s.tail_media == key.media_in(j * B, pos)
                   for s in self.groups.get(h, ()))

    def reserve_slot(self, protect: Sequence[Snapshot] = ()) -> int | None:
        """A free snapshot slot, evicting the least recently used snapshot if needed (None: all pinned)."""
        if not self.free_slots and not self.evict_one(protect):
            return None
        return self.free_slots.pop()

    def add(self, slot: int, key: PrefixKey, pos: int, seq_blocks: Sequence[int], boundary: bool = False) -> Snapshot:
        """Register the snapshot written into `slot`: key.ids[:pos], whose KV is in seq_blocks (the
        sequence's block table). Its full blocks are shared with equal cached ones where they exist."""
        B = self.block_size
        blocks, h = [], next(key.chain(B))[1]             # the chain's root (salted per cache_salt)
        for j, h in itertools.islice(key.chain(B), 1, pos // B + 1):
            b = self.by_hash.get(h)
            if b is None:
                b = seq_blocks[j - 1]
                if b in self.hash_of:                # already cached under another key: cannot happen for
                    raise RuntimeError("a KV block is cached under two keys")   # blocks are never rewritten
                self.by_hash[h], self.hash_of[b] = b, h
            blocks.append(b)
        group = h                                    # the deepest full block's chain key (the root below B)
        for b in blocks:
            if self.cache_refs.get(b, 0) == 0:
                self.blocks.ref([b])
            self.cache_refs[b] = self.cache_refs.get(b, 0) + 1
        snap = Snapshot(slot, pos, group, key.ids[pos // B * B:pos], key.media_in(pos // B * B, pos), blocks,
                        boundary, next(self.clock))
        self.groups.setdefault(group, []).append(snap)
        self.stats.snapshots_saved += 1
        return snap

    def release_slot(self, slot: int) -> None:
        self.free_slots.append(slot)

    # ------------------------------------------------------------------ eviction
    def evict_one(self, protect: Sequence[Snapshot] = ()) -> bool:
        candidates = [s for g in self.groups.values() for s in g if s.pins == 0 and s not in protect]
        if not candidates:
            return False
        self._drop(min(candidates, key=lambda s: s.last_used))
        self.stats.evictions += 1
        return True

    def make_room(self, n_blocks: int, protect: Sequence[Snapshot] = ()) -> bool:
        """Evict snapshots until n_blocks KV blocks are free; False if that cannot be done."""
        while self.blocks.num_free < n_blocks:
            if not self.evict_one(protect):
                return False
        return True

    def _drop(self, snap: Snapshot) -> None:
        group = self.groups[snap.group]
        group.remove(snap)
        if not group:
            del self.groups[snap.group]
        for b in snap.blocks:
            self.cache_refs[b] -= 1
            if self.cache_refs[b] == 0:
                del self.cache_refs[b]
                del self.by_hash[self.hash_of.pop(b)]
                self.blocks.free([b])
        self.free_slots.append(snap.slot)

    def clear(self) -> None:
        for snap in [s for g in self.groups.values() for s in g if s.pins == 0]:
            self._drop(snap)

    # ------------------------------------------------------------------ accounting
    @property
    def num_snapshots(self) -> int:
        return sum(len(g) for g in self.groups.values())

    @property
    def cached_only_blocks(self) -> int:
        """Blocks held by the cache and by no running request."""
        return sum(1 for b in self.cache_refs if self.blocks.count[b] == 1)


def snapshot_points(ids: Sequence[int], start: int, boundary_id: int | None, every: int,
                    end: int | None = None, min_gap: int = 0, max_boundaries: int | None = None) -> list[int]:
    """Where to snapshot while prefilling ids[start:end]: before each `boundary_id` token (a message start),
    every `every` tokens, and at the end. Sorted, all in (start, end]. Walking back from the end, a message
    start closer than min_gap to the one kept after it is skipped, and at most max_boundaries are kept: text
    that is full of boundary tokens (a file quoting chat markup) cannot make a request snapshot at every one."""
    end = len(ids) if end is None else end
    points = {end}
    if boundary_id is not None:
        kept: list[int] = []
        for i in range(end - 1, start, -1):
            if ids[i] == boundary_id and (not kept or kept[-1] - i >= min_gap):
                kept.append(i)
                if max_boundaries is not None and len(kept) == max_boundaries:
                    break
        points.update(kept)
    if every > 0:
        points.update(range((start // every + 1) * every, end, every))
    return sorted(p for p in points if p > start)
