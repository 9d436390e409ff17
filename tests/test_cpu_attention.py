"""The C++ paged attention (smolvlm_fast._cpu, csrc/cpu/paged_attention.cpp) against a dense float64 reference:
decode (one query per sequence) and prefill (packed queries, causal), through the kernels and through
numpy_ops.paged_attention, and the argument checks at the border.

Fresh random inputs every test; the caches' unused slots and every output are NaN-poisoned, so a read past a
sequence's keys or an element never written fails. Both kernels accumulate in float32: 1e-5 relative, like the
other CPU kernels."""
from __future__ import annotations

import numpy as np
import pytest

from smolvlm_fast.cpu import ops as numpy_ops

cpu = pytest.importorskip("smolvlm_fast._cpu", reason="the C++ extension is not built (pip install -e .)")

RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)


def paged_case(lens, q_lens, Hq, Hkv, Dh, block_size):
    """q [T, Hq, Dh] packed, query_start_loc, and NaN-poisoned caches whose used slots (reached through shuffled,
    non-consecutive block tables) hold random rows."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = 2 * sum(need) + 3  # every other block unused: tables are never consecutive
    ids = RNG.permutation(num_blocks)[:sum(need)].astype(np.int32)
    tables = np.full((len(lens), max(need) + 1), -1, np.int32)  # unused entries: not block ids
    k_cache = np.full((num_blocks, block_size, Hkv, Dh), np.nan, np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    used = 0
    for s, n in enumerate(lens):
        tables[s, :need[s]] = ids[used:used + need[s]]
        used += need[s]
        slots = np.arange(n)
        blocks, offsets = tables[s, slots // block_size], slots % block_size
        k_cache[blocks, offsets] = RNG.standard_normal((n, Hkv, Dh), dtype=np.float32) * 2
        v_cache[blocks, offsets] = RNG.standard_normal((n, Hkv, Dh), dtype=np.float32)
    q = RNG.standard_normal((sum(q_lens), Hq, Dh), dtype=np.float32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return q, k_cache, v_cache, tables, np.array(lens, np.int32), qsl


def reference(q, k_cache, v_cache, tables, lens, qsl, scale):
    """Dense causal attention in float64: query j of sequence s sits at position lens[s] - q_len + j."""
    T, Hq, Dh = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = np.zeros((T, Hq, Dh), np.float64)
    for s, n in enumerate(lens):
        a, b = qsl[s], qsl[s + 1]
        slots = np.arange(n)
        k = k_cache[tables[s, slots // block_size], slots % block_size].astype(np.float64)  # [n, Hkv, Dh]
        v = v_cache[tables[s, slots // block_size], slots % block_size].astype(np.float64)
        k, v = np.repeat(k, Hq // Hkv, axis=1), np.repeat(v, Hq // Hkv, axis=1)  # [n, Hq, Dh]
        scores = np.einsum("qhd,khd->hqk", q[a:b].astype(np.float64), k) * scale  # [Hq, q_len, n]
        positions = n - (b - a) + np.arange(b - a)
        scores[:, positions[:, None] < slots[None, :]] = -np.inf
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[a:b] = np.einsum("hqk,khd->qhd", p / p.sum(axis=-1, keepdims=True), v)
    return out


def close(ours: np.ndarray, expect: np.ndarray, tol: float = 1e-5):
    assert ours.dtype == np.float32 and ours.shape == expect.shape
    assert not np.isnan(ours).any(), f"{int(np.isnan(ours).sum())} NaN outputs (unwritten, or a poisoned slot read)"
    np.testing.assert_allclose(ours, expect, rtol=tol, atol=tol * np.abs(expect).max())


def prefill(q, k_cache, v_cache, tables, lens, qsl, scale):
    out = np.full(q.shape, np.nan, np.float32)
    cpu.paged_prefill_attention(q, k_cache, v_cache, tables, lens, qsl, scale, out)
    return out


def decode(q, k_cache, v_cache, tables, lens, scale):
    out = np.full(q.shape, np.nan, np.float32)
    cpu.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, out)
    return out


SHAPES = [pytest.param(Hq, Hkv, Dh, id=f"{Hq}over{Hkv}-d{Dh}") for Hq, Hkv in [(9, 3), (4, 4)] for Dh in [64, 72, 80, 128]]


def mixed_batch(B: int):
    """(seq_lens, q_lens): a decode step, a whole prompt, a chunk after a cached prefix, prompts ending mid-block and
    on a block edge, a single key, and one sequence much longer than the others."""
    lens = [B + 5, 3 * B + 7, 2 * B + 3, B, 1, 2 * B, 29 * B + 11]
    q_lens = [1, 3 * B + 7, B + 2, B, 1, 2, 45]
    return lens, q_lens


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("Hq,Hkv,Dh", SHAPES)
def test_prefill_matches_reference(Hq, Hkv, Dh, block_size):
    q, k_cache, v_cache, tables, lens, qsl = paged_case(*mixed_batch(block_size), Hq, Hkv, Dh, block_size)
    scale = Dh**-0.5
    close(prefill(q, k_cache, v_cache, tables, lens, qsl, scale), reference(q, k_cache, v_cache, tables, lens, qsl, scale))


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("Hq,Hkv,Dh", SHAPES)
def test_decode_matches_reference(Hq, Hkv, Dh, block_size):
    """Lengths that split into pieces (and merge) and lengths that do not."""
    lens = [1, block_size // 2 + 3, block_size, 2 * block_size, 64, 65, 517, 2100]
    q, k_cache, v_cache, tables, seq_lens, qsl = paged_case(lens, [1] * len(lens), Hq, Hkv, Dh, block_size)
    scale = Dh**-0.5
    close(decode(q, k_cache, v_cache, tables, seq_lens, scale), reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale))


def test_one_query_sequences_are_decoded_exactly_as_decode():
    """In a mixed batch, a sequence with one query gets the decode kernel's result bit for bit, whatever else is in
    the batch; a batch of single queries through the prefill entry point equals the decode call."""
    q, k_cache, v_cache, tables, lens, qsl = paged_case(*mixed_batch(16), 9, 3, 64, 16)
    mixed = prefill(q, k_cache, v_cache, tables, lens, qsl, 0.125)
    for s in np.flatnonzero(np.diff(qsl) == 1):
        row = qsl[s]
        alone = decode(q[row:row + 1].copy(), k_cache, v_cache, tables[s:s + 1].copy(), lens[s:s + 1].copy(), 0.125)
        np.testing.assert_array_equal(mixed[row], alone[0])
    lens = np.array([300, 7, 1, 1200], np.int32)
    q, k_cache, v_cache, tables, lens, qsl = paged_case(lens, [1] * 4, 9, 3, 64, 16)
    np.testing.assert_array_equal(prefill(q, k_cache, v_cache, tables, lens, qsl, 0.125),
                                  decode(q, k_cache, v_cache, tables, lens, 0.125))


def test_prefill_equals_decoding_one_query_at_a_time():
    """Causality: each query of a prompt sees exactly the keys a decode step at its position would."""
    n = 70
    q, k_cache, v_cache, tables, lens, qsl = paged_case([n], [n], 9, 3, 80, 16)
    whole = prefill(q, k_cache, v_cache, tables, lens, qsl, 0.1)
    steps = np.concatenate([decode(q[j:j + 1].copy(), k_cache, v_cache, tables, np.array([j + 1], np.int32), 0.1)
                            for j in range(n)])
    close(whole, steps.astype(np.float64))


@pytest.mark.parametrize("scale", [0.0, 1e-3, 3.0, 40.0])
def test_prefill_any_scale(scale, monkeypatch):
    """Flat softmax (0) to nearly one-hot (exp underflowing to 0 for most keys). Scores in the thousands carry
    float32 rounding of 1e-4 and more, so the bound is derived: at most twice the NumPy float32 code's error."""
    q, k_cache, v_cache, tables, lens, qsl = paged_case([1, 37, 300], [1, 37, 50], 9, 3, 64, 32)
    expect = reference(q, k_cache, v_cache, tables, lens, qsl, scale)
    monkeypatch.setattr(numpy_ops, "_cpu", None)
    numpy_fp32 = numpy_ops.paged_attention(q, k_cache, v_cache, tables, lens, query_start_loc=qsl, scale=scale)
    numpy_err = np.abs(numpy_fp32 - expect).max() / np.abs(expect).max()
    close(prefill(q, k_cache, v_cache, tables, lens, qsl, scale), expect, tol=max(1e-5, 2 * numpy_err))


def test_sequences_without_queries():
    """A sequence with no new queries (q_len 0) takes no rows and changes nothing for the others."""
    q, k_cache, v_cache, tables, lens, qsl = paged_case([40, 9, 25], [0, 9, 0], 4, 2, 64, 16)
    assert q.shape[0] == 9
    close(prefill(q, k_cache, v_cache, tables, lens, qsl, 0.125), reference(q, k_cache, v_cache, tables, lens, qsl, 0.125))


def threads_agree(make_case, decode_lens: list[int]) -> None:
    """Prefill and decode attention give the same bits on 1 and 3 threads, over caches from make_case
    (paged_case's signature)."""
    q, k_cache, v_cache, tables, lens, qsl = make_case(*mixed_batch(16), 9, 3, 64, 16)
    dq, dk, dv, dtables, dlens, _ = make_case(decode_lens, [1] * len(decode_lens), 9, 3, 64, 16)
    before = cpu.get_num_threads()
    try:
        results = []
        for threads in (1, 3):
            cpu.set_num_threads(threads)
            results.append((prefill(q, k_cache, v_cache, tables, lens, qsl, 0.125),
                            decode(dq, dk, dv, dtables, dlens, 0.125)))
    finally:
        cpu.set_num_threads(before)
    for one, three in zip(*results):
        np.testing.assert_array_equal(one, three)


def test_threads_give_identical_results():
    threads_agree(paged_case, [300, 517, 64, 1500])


# ---------------------------------------------------------------- through numpy_ops.paged_attention


def test_paged_attention_runs_prefill_in_cpp(monkeypatch):
    q, k_cache, v_cache, tables, lens, qsl = paged_case(*mixed_batch(16), 9, 3, 64, 16)
    expect = reference(q, k_cache, v_cache, tables, lens, qsl, 64**-0.5)
    calls = []
    real = cpu.paged_prefill_attention
    spy = type("Spy", (), {"paged_prefill_attention": staticmethod(lambda *a: calls.append(1) or real(*a))})
    monkeypatch.setattr(numpy_ops, "_cpu", spy)
    close(numpy_ops.paged_attention(q, k_cache, v_cache, tables, lens, query_start_loc=qsl), expect)
    assert len(calls) == 1
    monkeypatch.setattr(numpy_ops, "_cpu", None)  # the NumPy code it replaces
    close(numpy_ops.paged_attention(q, k_cache, v_cache, tables, lens, query_start_loc=qsl), expect)


def test_paged_attention_prefill_with_rope_and_strided_queries():
    """As the model calls it: q a view into the fused QKV output, rotated inside paged_attention."""
    q, k_cache, v_cache, tables, lens, qsl = paged_case([33, 20], [33, 4], 9, 3, 64, 16)
    qkv = RNG.standard_normal((q.shape[0], 15, 64), dtype=np.float32)
    cos_sin = numpy_ops.rope_table(64, 64, 10000.0)
    positions = np.concatenate([np.arange(33), np.arange(16, 20)]).astype(np.int32)
    ours = numpy_ops.paged_attention(qkv[:, :9], k_cache, v_cache, tables, lens, query_start_loc=qsl,
                                     cos_sin=cos_sin, positions=positions)
    rotated = numpy_ops.apply_rope(np.ascontiguousarray(qkv[:, :9]), cos_sin, positions)
    close(ours, reference(rotated, k_cache, v_cache, tables, lens, qsl, 64**-0.5))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S,Hq,Hkv,Dh", [(13, 9, 3, 64), (70, 4, 4, 72), (257, 12, 12, 80), (2, 9, 3, 128)])
def test_rope_attention_runs_dense_attention_in_cpp(monkeypatch, causal, S, Hq, Hkv, Dh):
    """The vision encoder's attention (no padding): each batch row's K/V as one cache block, causal or not, against
    the NumPy code it replaces."""
    B = 3
    q = RNG.standard_normal((B, S, Hq, Dh), dtype=np.float32)
    k, v = (RNG.standard_normal((B, S, Hkv, Dh), dtype=np.float32) for _ in range(2))
    calls = []
    real = cpu.paged_prefill_attention
    spy = type("Spy", (), {"paged_prefill_attention": staticmethod(
        lambda *a, **kw: calls.append(kw) or real(*a, **kw))})
    monkeypatch.setattr(numpy_ops, "_cpu", spy)
    ours = numpy_ops.rope_attention(q, k, v, causal=causal)
    assert calls == [{"causal": causal}]
    monkeypatch.setattr(numpy_ops, "_cpu", None)
    close(ours, numpy_ops.rope_attention(q, k, v, causal=causal))


# ---------------------------------------------------------------- bad arguments


def bad_cases(decode: bool):
    """(message, arguments) for paged_decode_attention (decode) or paged_prefill_attention: one argument wrong each."""
    q, k_cache, v_cache, tables, lens, qsl = paged_case([20, 5], [1, 1] if decode else [20, 2], 9, 3, 64, 16)
    T = q.shape[0]
    a = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, seq_lens=lens, scale=0.125,
             out=np.empty((T, 9, 64), np.float32))
    if not decode:
        a["query_start_loc"] = qsl
    yield "q must be float32", dict(a, q=q.astype(np.float64))
    yield rf"q must be \[{'S' if decode else 'T'}, Hq, Dh\]", dict(a, q=q[0])
    yield "q must be C-contiguous", dict(a, q=np.asfortranarray(q))
    yield r"k_cache must be \[num_blocks", dict(a, k_cache=k_cache[0])
    yield "k_cache must have shape", dict(a, k_cache=k_cache[..., :32].copy())
    yield "v_cache must have shape", dict(a, v_cache=v_cache[:-1].copy())
    yield "v_cache must be float32", dict(a, v_cache=v_cache.astype(np.float16))
    yield "k_cache must be C-contiguous", dict(a, k_cache=k_cache.transpose(1, 0, 2, 3))
    yield "block_tables must be int32", dict(a, block_tables=tables.astype(np.int64))
    yield r"block_tables must be \[S, max_blocks\]", dict(a, block_tables=tables.reshape(-1))
    yield r"seq_lens must have shape \[2\]", dict(a, seq_lens=lens[:1].copy())
    yield "seq_lens must be int32", dict(a, seq_lens=lens.astype(np.int64))
    if decode:  # prefill takes S from block_tables
        yield r"block_tables must have shape \[2, ", dict(a, block_tables=tables[:1].copy())
    else:
        yield r"query_start_loc must have shape \[3\]", dict(a, query_start_loc=qsl[:2].copy())
        yield "query_start_loc must be int32", dict(a, query_start_loc=qsl.astype(np.int64))
        yield "query_start_loc must run from 0 to T = 22", dict(a, query_start_loc=np.array([1, 20, 22], np.int32))
        yield "query_start_loc must run from 0 to T = 22", dict(a, query_start_loc=np.array([0, 20, 21], np.int32))
        yield r"sequence 0 has -2 queries", dict(a, query_start_loc=np.array([0, -2, 22], np.int32))
        yield r"sequence 1 has 7 queries \(query_start_loc\), not in \[0, seq_lens\[1\] = 5\]", dict(
            a, query_start_loc=np.array([0, 15, 22], np.int32))
    yield r"seq_lens\[1\] = 0 is not in", dict(a, seq_lens=np.array([20, 0], np.int32))
    yield r"seq_lens\[0\] = 49 is not in \[1, max_blocks \* block_size = 48\]", dict(
        a, seq_lens=np.array([49, 5], np.int32))
    num_blocks = k_cache.shape[0]
    bad = tables.copy()
    bad[0, 1] = num_blocks
    yield rf"block_tables\[0, 1\] = {num_blocks} is not a block id in \[0, {num_blocks}\)", dict(a, block_tables=bad)
    bad = tables.copy()
    bad[1, 0] = -1
    yield r"block_tables\[1, 0\] = -1 is not a block id", dict(a, block_tables=bad)
    yield "Hq a multiple of Hkv", dict(a, q=q[:, :8].copy(), out=np.empty((T, 8, 64), np.float32))
    yield rf"out must have shape \[{T}, 9, 64\]", dict(a, out=np.empty((T, 9, 63), np.float32))
    yield rf"out must have shape \[{T}, 9, 64\]", dict(a, out=np.empty((T + 1, 9, 64), np.float32))
    read_only = np.empty((T, 9, 64), np.float32)
    read_only.flags.writeable = False
    yield "out must be writeable", dict(a, out=read_only)
    yield "out overlaps q", dict(a, out=q)
    yield "scale must be finite", dict(a, scale=float("inf"))
    yield "scale must be finite", dict(a, scale=float("nan"))


@pytest.mark.parametrize("entry,message,args", [(entry, *case) for entry in ("decode", "prefill")
                                                 for case in bad_cases(entry == "decode")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_rejects_bad_arguments(entry, message, args):
    with pytest.raises(ValueError, match=message):
        getattr(cpu, f"paged_{entry}_attention")(**args)


def test_empty_batch():
    q, k_cache, v_cache, tables, lens, qsl = paged_case([5], [5], 4, 2, 64, 16)
    out = np.empty((0, 4, 64), np.float32)
    cpu.paged_prefill_attention(q[:0], k_cache, v_cache, tables[:0], lens[:0], qsl[:1], 0.125, out)
    cpu.paged_decode_attention(q[:0], k_cache, v_cache, tables[:0], lens[:0], 0.125, out)


def test_kv_cache_zeros_is_aligned_and_usable():
    k_cache, v_cache = numpy_ops.kv_cache_zeros((7, 16, 3, 64)), numpy_ops.kv_cache_zeros((7, 16, 3, 64))
    for cache in (k_cache, v_cache):
        assert cache.ctypes.data % 64 == 0 and cache.flags.c_contiguous and cache.flags.writeable
        assert cache.dtype == np.float32 and cache.shape == (7, 16, 3, 64) and not cache.any()
        cache[:] = RNG.standard_normal(cache.shape, dtype=np.float32)
    tables = np.array([[5, 0, 3, 6], [2, 0, 0, 0]], np.int32)
    lens, qsl = np.array([50, 3], np.int32), np.array([0, 50, 51], np.int32)
    q = RNG.standard_normal((51, 9, 64), dtype=np.float32)
    close(prefill(q, k_cache, v_cache, tables, lens, qsl, 0.125), reference(q, k_cache, v_cache, tables, lens, qsl, 0.125))
