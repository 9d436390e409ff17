"""The paged cache's bookkeeping: blocks, slots and metadata, with no torch involved."""
import pytest

from smolvlm_fast.cache import BlockAllocator, CacheFull, PagedCache, schedule_step


def test_slots_follow_the_block_table():
    cache = PagedCache(num_blocks=8, block_size=4)
    cache.append(7, 3)  # another sequence takes block 0 first
    slots = cache.append(1, 6)
    table = cache.block_tables[1]
    assert len(table) == 2 and 0 not in table
    assert slots == [table[p // 4] * 4 + p % 4 for p in range(6)]
    assert cache.append(1, 2) == [table[1] * 4 + 2, table[1] * 4 + 3]  # fills the block exactly to its edge
    assert len(cache.block_tables[1]) == 2
    cache.append(1, 1)
    assert len(cache.block_tables[1]) == 3 and cache.seq_lens[1] == 9


def test_free_returns_blocks_and_full_cache_raises():
    cache = PagedCache(num_blocks=2, block_size=2)
    cache.append(0, 4)
    assert cache.allocator.num_free == 0
    assert not cache.can_fit({1: 1})
    with pytest.raises(CacheFull):
        cache.append(1, 1)
    cache.free(0)
    assert cache.allocator.num_free == 2 and cache.can_fit({1: 4})


def test_schedule_step_packs_sequences():
    cache = PagedCache(num_blocks=16, block_size=4)
    meta = schedule_step(cache, {0: 5, 1: 2})
    assert meta.positions == [0, 1, 2, 3, 4, 0, 1]
    assert meta.query_start_loc == [0, 5, 7] and meta.last_token_indices == [4, 6]
    assert meta.seq_lens == [5, 2]
    assert [len(t) for t in meta.block_tables] == [2, 2]  # padded to the widest table
    meta = schedule_step(cache, {0: 1, 1: 1})
    assert meta.positions == [5, 2] and meta.seq_lens == [6, 3]


def test_allocator_rejects_nonsense():
    with pytest.raises(ValueError):
        BlockAllocator(0)
    with pytest.raises(ValueError):
        PagedCache(4, 0)
