"""KV-cache blocks shared by running sequences and the prefix cache, counted by reference."""
from __future__ import annotations


class BlockAllocator:
    """KV blocks with reference counts (a running sequence holds one on each block of its table, the prefix
    cache one on each block it keeps); a block whose count drops to zero goes back to the free list."""

    def __init__(self, num_blocks: int):
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        self.count = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free_blocks):
            return None
        out = [self.free_blocks.pop() for _ in range(n)]
        for b in out:
            self.count[b] = 1
        return out

    def ref(self, blocks: list[int]) -> None:
        for b in blocks:
            self.count[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self.count[b] -= 1
            if self.count[b] == 0:
                self.free_blocks.append(b)
