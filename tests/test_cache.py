"""The paged cache's bookkeeping: blocks, slots and metadata, with no torch involved."""
import numpy as np
import pytest

from smolvlm_fast.engine.cache import BlockAllocator, CacheFull, FeatureCache, PagedCache, block_digest, schedule_step, step_metadata


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


# ---------------------------------------------------------------- reference counts and prefix caching


def test_a_named_block_outlives_its_last_user_until_evicted():
    allocator = BlockAllocator(3, enable_caching=True)
    a, b = allocator.allocate(), allocator.allocate()
    allocator.name(a, b"A")
    allocator.share(a)  # a second user
    allocator.free(a)
    assert allocator.ref_counts[a] == 1 and allocator.num_free == 1
    allocator.free(a)
    allocator.free(b)
    assert allocator.num_free == 3 and allocator.lookup(b"A") == a  # still findable, yet counted as free
    assert {allocator.allocate(), allocator.allocate()} == {b, 2}  # unnamed blocks are handed out first
    assert allocator.evictions == 0 and allocator.lookup(b"A") == a
    assert allocator.allocate() == a and allocator.evictions == 1  # then the named one, which loses its name
    assert allocator.lookup(b"A") is None


def test_eviction_takes_the_least_recently_freed_named_block():
    allocator = BlockAllocator(3, enable_caching=True)
    blocks = [allocator.allocate() for _ in range(3)]
    for block, name in zip(blocks, (b"x", b"y", b"z")):
        allocator.name(block, name)
    for block in (blocks[1], blocks[0], blocks[2]):
        allocator.free(block)
    allocator.share(blocks[1])  # taken back from the LRU list...
    allocator.free(blocks[1])   # ...and freed again: now the most recent
    assert [allocator.allocate() for _ in range(2)] == [blocks[0], blocks[2]]
    assert allocator.lookup(b"y") == blocks[1]


def test_names_are_kept_only_with_caching_and_only_once():
    plain = BlockAllocator(2)
    plain.name(plain.allocate(), b"A")
    assert plain.lookup(b"A") is None
    allocator = BlockAllocator(2, enable_caching=True)
    first, second = allocator.allocate(), allocator.allocate()
    allocator.name(first, b"A")
    allocator.name(second, b"A")  # the same content computed twice: the first block keeps the name
    assert allocator.lookup(b"A") == first
    allocator.free(first)
    allocator.reset()
    assert allocator.lookup(b"A") is None and allocator.num_free == 1


def test_block_digests_chain_and_name_images():
    first = block_digest(b"", [1, 2, 3, 4])
    assert block_digest(b"", [1, 2, 3, 4]) == first
    assert block_digest(first, [5, 6]) != block_digest(block_digest(b"", [9, 2, 3, 4]), [5, 6])  # the prefix counts
    image_ids = [7, 7, 7, 7]  # the same <image> ids...
    cat, dog = block_digest(b"", image_ids, ((b"cat", 0),)), block_digest(b"", image_ids, ((b"dog", 0),))
    assert len({cat, dog, block_digest(b"", image_ids), block_digest(b"", image_ids, ((b"cat", 4),))}) == 4


def test_a_sequence_takes_the_cached_blocks_of_its_leading_digests():
    cache = PagedCache(num_blocks=6, block_size=4, enable_prefix_caching=True)
    cache.append(0, 10)
    names = [b"a", b"b"]
    cache.name_blocks(0, names)  # its two full blocks
    table = list(cache.block_tables[0])
    assert cache.match_prefix(1, [b"a", b"b", b"c"]) == 8
    assert cache.block_tables[1] == table[:2] and cache.allocator.ref_counts[table[0]] == 2
    slots = cache.append(1, 3)  # the new tokens go to a block of its own
    assert cache.block_tables[1][2] not in table and slots[0] == cache.block_tables[1][2] * 4
    meta = step_metadata(cache, {1: slots})
    assert meta.positions == [8, 9, 10] and meta.seq_lens == [11]
    cache.free(0)
    cache.free(1)
    assert cache.allocator.num_free == 6
    assert cache.match_prefix(2, [b"a", b"x"]) == 4  # still cached after both left


def test_a_sequence_frees_its_tail_first_onto_the_lru_list():
    cache = PagedCache(num_blocks=3, block_size=2, enable_prefix_caching=True)
    cache.append(0, 6)
    head, middle, tail = cache.block_tables[0]
    cache.name_blocks(0, [b"1", b"2", b"3"])
    cache.free(0)
    assert cache.allocator.allocate() == tail and cache.allocator.allocate() == middle
    assert cache.match_prefix(1, [b"1"]) == 2 and cache.block_tables[1] == [head]


def test_feature_cache_is_bounded_in_bytes():
    cache = FeatureCache(max_bytes=3 * 400)
    arrays = {k: np.full((10, 10), i, np.float32) for i, k in enumerate((b"a", b"b", b"c", b"d"))}  # 400 bytes each
    for key in (b"a", b"b", b"c"):
        cache.put(key, arrays[key])
    assert cache.get(b"a") is arrays[b"a"]  # now the most recently used
    cache.put(b"d", arrays[b"d"])
    assert cache.get(b"b") is None and len(cache) == 3 and cache.nbytes == 1200
    cache.put(b"huge", np.zeros(1000, np.float32))  # larger than the whole cache: not kept
    assert cache.get(b"huge") is None and cache.get(b"a") is not None
