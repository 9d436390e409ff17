"""The paged KV cache's bookkeeping: a block allocator, per-sequence block tables and slot mapping.

Plain Python, no torch: both backends use it. The cache tensors themselves ([num_blocks, block_size,
kv_heads, head_dim] per layer) are allocated by the caller and indexed through what this builds.
"""
from __future__ import annotations

from dataclasses import dataclass


class CacheFull(RuntimeError):
    """No free block is left for a sequence's next tokens."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFull(f"all {self.num_blocks} KV-cache blocks are in use")
        return self._free.pop()

    def free(self, block: int) -> None:
        self._free.append(block)


class PagedCache:
    """Which blocks each sequence owns and how many of its tokens are cached."""

    def __init__(self, num_blocks: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.seq_lens: dict[int, int] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_fit(self, extra_tokens: dict[int, int]) -> bool:
        """Whether every sequence (new or existing) can grow by its number of extra tokens."""
        needed = sum(self.blocks_needed(self.seq_lens.get(s, 0) + n) - len(self.block_tables.get(s, ()))
                     for s, n in extra_tokens.items())
        return needed <= self.allocator.num_free

    def append(self, seq_id: int, num_tokens: int) -> list[int]:
        """Reserve room for num_tokens more tokens of seq_id; returns their slots (block * block_size + offset)."""
        table = self.block_tables.setdefault(seq_id, [])
        start = self.seq_lens.get(seq_id, 0)
        end = start + num_tokens
        try:
            while len(table) < self.blocks_needed(end):
                table.append(self.allocator.allocate())
        except CacheFull:
            self.free(seq_id)
            raise
        self.seq_lens[seq_id] = end
        return [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]

    def free(self, seq_id: int) -> None:
        for block in self.block_tables.pop(seq_id, []):
            self.allocator.free(block)
        self.seq_lens.pop(seq_id, None)


@dataclass
class StepMetadata:
    """What one forward step needs to know about the cache, as plain lists (the runner makes tensors)."""
    positions: list[int]          # [T] position of each packed token in its sequence
    slot_mapping: list[int]       # [T] where each token's K/V are written
    block_tables: list[list[int]]  # [num_seqs, max_blocks], padded with 0
    seq_lens: list[int]           # [num_seqs] cached tokens per sequence, the new ones included
    query_start_loc: list[int]    # [num_seqs + 1] cumulative new-token counts
    last_token_indices: list[int]  # [num_seqs] index in the packed tokens of each sequence's last token


def schedule_step(cache: PagedCache, new_tokens: dict[int, int]) -> StepMetadata:
    """Reserve cache room for each sequence's new tokens (in dict order) and describe the packed step."""
    positions, slots, starts = [], [], [0]
    for seq_id, n in new_tokens.items():
        start = cache.seq_lens.get(seq_id, 0)
        slots += cache.append(seq_id, n)
        positions += range(start, start + n)
        starts.append(starts[-1] + n)
    tables = [cache.block_tables[s] for s in new_tokens]
    width = max(len(t) for t in tables)
    return StepMetadata(
        positions=positions,
        slot_mapping=slots,
        block_tables=[t + [0] * (width - len(t)) for t in tables],
        seq_lens=[cache.seq_lens[s] for s in new_tokens],
        query_start_loc=starts,
        last_token_indices=[e - 1 for e in starts[1:]],
    )
