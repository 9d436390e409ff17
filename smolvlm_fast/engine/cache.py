"""The paged KV cache's bookkeeping: a reference-counted block allocator with prefix caching, per-sequence block
tables and slot mapping, and the LRU cache of image features.

Plain Python, no torch: both backends use it. The cache tensors themselves ([num_blocks, block_size,
kv_heads, head_dim] per layer) are allocated by the caller and indexed through what this builds.

Prefix caching. A full block is named by a digest chained over the previous block's digest, its token ids and,
when it holds image tokens, the content hash of each image whose tokens it holds with the offset of its first such
token into that image (so two images behind the same <image> ids never share a block). When its last user frees
it, a named block keeps its K/V and its name on an LRU list; a new sequence whose leading blocks have the same
names takes them instead of recomputing them. A fresh block comes from the never-named free blocks first, then
from the least recently freed named one, which loses its name (an eviction).
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from ..models.batch import StepMetadata


class CacheFull(RuntimeError):
    """No free block is left for a sequence's next tokens."""


def block_digest(parent: bytes, token_ids, images: tuple[tuple[bytes, int], ...] = ()) -> bytes:
    """The name of a full block: (parent block's digest, its token ids, (image hash, offset) per image it holds)."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for image_hash, offset in images:
        h.update(b"image" + image_hash + struct.pack("<q", offset))
    return h.digest()


class BlockAllocator:
    """Hands out KV-cache blocks by reference count; with caching, keeps freed named blocks findable (LRU)."""

    def __init__(self, num_blocks: int, enable_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks, self.enable_caching = num_blocks, enable_caching
        self.ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # unnamed; pop() hands out block 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # named, unreferenced: least recently freed first
        self._digest_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self.evictions += 1
        else:
            raise CacheFull(f"all {self.num_blocks} KV-cache blocks are in use")
        self.ref_counts[block] = 1
        return block

    def free(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] > 0:
            return
        if block in self._digest_of:
            self._evictable[block] = None
        else:
            self._free.append(block)

    def lookup(self, digest: bytes) -> int | None:
        return self._block_of.get(digest)

    def share(self, block: int) -> None:
        """One more user of a named block (taken back from the LRU list if nobody held it)."""
        if self.ref_counts[block] == 0:
            del self._evictable[block]
        self.ref_counts[block] += 1

    def name(self, block: int, digest: bytes) -> None:
        """Make a full, computed block findable by its digest (a digest already taken keeps its block)."""
        if self.enable_caching and digest not in self._block_of and block not in self._digest_of:
            self._block_of[digest], self._digest_of[block] = block, digest

    def reset(self) -> None:
        """Forget every unreferenced named block (blocks in use keep their names)."""
        for block in self._evictable:
            self._forget(block)
            self._free.append(block)
        self._evictable.clear()

    def _forget(self, block: int) -> None:
        del self._block_of[self._digest_of.pop(block)]


class PagedCache:
    """Which blocks each sequence owns and how many of its tokens are cached."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, enable_prefix_caching)
        self.block_tables: dict[int, list[int]] = {}
        self.seq_lens: dict[int, int] = {}
        self._named: dict[int, int] = {}  # per sequence, how many of its leading blocks carry their digest

    @property
    def capacity(self) -> int:
        """Tokens the whole cache holds."""
        return self.allocator.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_fit(self, extra_tokens: dict[int, int]) -> bool:
        """Whether every sequence (new or existing) can grow by its number of extra tokens."""
        needed = sum(self.blocks_needed(self.seq_lens.get(s, 0) + n) - len(self.block_tables.get(s, ()))
                     for s, n in extra_tokens.items())
        return needed <= self.allocator.num_free

    def room(self, seq_id: int) -> int:
        """How many more tokens seq_id can take now: its last block's free slots plus every free block."""
        table_tokens = len(self.block_tables.get(seq_id, ())) * self.block_size
        return table_tokens - self.seq_lens.get(seq_id, 0) + self.allocator.num_free * self.block_size

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

    def match_prefix(self, seq_id: int, digests: list[bytes]) -> int:
        """Give a new sequence the cached blocks named by its leading digests; returns the tokens they hold."""
        table = []
        for digest in digests:
            block = self.allocator.lookup(digest)
            if block is None:
                break
            self.allocator.share(block)
            table.append(block)
        self.block_tables[seq_id], self._named[seq_id] = table, len(table)
        self.seq_lens[seq_id] = len(table) * self.block_size
        return self.seq_lens[seq_id]

    def name_blocks(self, seq_id: int, digests: list[bytes]) -> None:
        """Register digests[i] for block i of seq_id: its full blocks, now computed."""
        table, start = self.block_tables[seq_id], self._named.get(seq_id, 0)
        for i in range(start, len(digests)):
            self.allocator.name(table[i], digests[i])
        self._named[seq_id] = max(start, len(digests))

    def free(self, seq_id: int) -> None:
        # The tail first: on the LRU list a sequence's last blocks (the least shared) are evicted before its first.
        for block in reversed(self.block_tables.pop(seq_id, [])):
            self.allocator.free(block)
        self.seq_lens.pop(seq_id, None)
        self._named.pop(seq_id, None)






def schedule_step(cache: PagedCache, new_tokens: dict[int, int]) -> StepMetadata:
    """Reserve cache room for each sequence's new tokens (in dict order) and describe the packed step."""
    return step_metadata(cache, {seq_id: cache.append(seq_id, n) for seq_id, n in new_tokens.items()})


def step_metadata(cache: PagedCache, slots: dict[int, list[int]]) -> StepMetadata:
    """Describe a packed step whose sequences' new tokens (in dict order) were just appended at `slots`."""
    positions, starts = [], [0]
    for seq_id, new in slots.items():
        end = cache.seq_lens[seq_id]
        positions += range(end - len(new), end)
        starts.append(starts[-1] + len(new))
    tables = [cache.block_tables[s] for s in slots]
    width = max(len(t) for t in tables)
    return StepMetadata(
        positions=positions,
        slot_mapping=[slot for new in slots.values() for slot in new],
        block_tables=[t + [0] * (width - len(t)) for t in tables],
        seq_lens=[cache.seq_lens[s] for s in slots],
        query_start_loc=starts,
        last_token_indices=[e - 1 for e in starts[1:]],
    )


class FeatureCache:
    """Image features by content hash, bounded in bytes; the least recently used go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._items: OrderedDict[bytes, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes):
        features = self._items.get(key)
        if features is not None:
            self._items.move_to_end(key)
        return features

    def put(self, key: bytes, features) -> None:
        size = int(features.nbytes)
        if key in self._items or size > self.max_bytes:
            return
        self._items[key], self.nbytes = features, self.nbytes + size
        while self.nbytes > self.max_bytes:
            self.nbytes -= int(self._items.popitem(last=False)[1].nbytes)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0
