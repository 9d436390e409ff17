"""The NumPy ops (cpu/ops.py) against the PyTorch reference, op by op, in float32 within 1e-5 relative.

Fresh random inputs every test; caches are NaN-poisoned so a slot the op should write and does not fails.
"""
import warnings

import numpy as np
import pytest
import torch

from smolvlm_fast.engine.cache import PagedCache, schedule_step
from smolvlm_fast.cpu import ops as npo
from smolvlm_fast.ops import reference as ref

RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)


def randn(*shape):
    return RNG.standard_normal(shape, dtype=np.float32)


def close(ours, expect, tol=1e-5):
    expect = expect.detach().numpy() if isinstance(expect, torch.Tensor) else expect
    assert ours.dtype == np.float32 and ours.shape == expect.shape
    np.testing.assert_allclose(ours, expect, rtol=tol, atol=tol * np.abs(expect).max())


T = torch.from_numpy


def test_small_ops():
    x, r, w, b = randn(7, 576), randn(7, 576), randn(576), randn(576)
    close(npo.rms_norm(x, w, 1e-5), ref.rms_norm(T(x), T(w), 1e-5))
    y, s = npo.rms_norm(x, w, 1e-5, residual=r)
    y_ref, s_ref = ref.rms_norm(T(x), T(w), 1e-5, residual=T(r))
    close(y, y_ref), close(s, s_ref)
    close(npo.layer_norm(x, w, b, 1e-6), ref.layer_norm(T(x), T(w), T(b), 1e-6))
    x = randn(5, 2 * 80) * 4
    x[0] *= 100  # exp(-x) overflows float32 here: no warning, no inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(npo.silu_and_mul(x), ref.silu_and_mul(T(x)))
        close(npo.gelu_tanh(x), ref.gelu_tanh(T(x)))


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, None), (80, None), (64, 32)])
def test_rope(head_dim, rotary_dim):
    table = npo.rope_table(rotary_dim or head_dim, 8192, 100000.0)
    ref_table = ref.rope_table(rotary_dim or head_dim, 8192, 100000.0).numpy()
    assert np.abs(table - ref_table).max() <= 1e-6  # float32 cos/sin of the same float32 angles
    x, pos = randn(11, 3, head_dim), RNG.integers(0, 8192, 11).astype(np.int32)
    close(npo.apply_rope(x, table, pos, rotary_dim), ref.apply_rope(T(x), T(ref_table), T(pos), rotary_dim))


@pytest.mark.parametrize("groups", [1, 3])
def test_patch_embed(groups):
    pixels, weight, bias = randn(2, 3, 32, 48), randn(12, 3 // groups, 16, 16), randn(12)
    pos_embed, pos_ids = randn(10, 12), RNG.integers(0, 10, (2, 6))
    out = npo.patch_embed(pixels, weight, bias, pos_embed, pos_ids, groups=groups)
    close(out, ref.patch_embed(T(pixels), T(weight), T(bias), T(pos_embed), T(pos_ids), groups=groups), 1e-4)


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Attention in one piece, or in chunks of a few queries (as long prompts are done)."""
    if request.param == "chunked":
        monkeypatch.setattr(npo, "MAX_SCORES", 9 * 3 * 20)


@pytest.mark.parametrize("causal", [True, False])
def test_rope_attention(causal, chunking):
    B, S, Hq, Hkv, D = 3, 13, 9, 3, 64
    q, k, v = randn(B, S, Hq, D), randn(B, S, Hkv, D), randn(B, S, Hkv, D)
    seq_lens, key_mask = np.array([13, 5, 1], np.int32), RNG.random((B, S)) < 0.7
    key_mask[:, 0] = True
    table, pos = npo.rope_table(D, 64, 10000.0), RNG.integers(0, 64, (B, S)).astype(np.int32)
    for kwargs in ({"seq_lens": seq_lens}, {"key_mask": key_mask}, {"cos_sin": table, "positions": pos}):
        out = npo.rope_attention(q, k, v, causal=causal, **kwargs)
        ref_kwargs = {name: T(value) for name, value in kwargs.items()}
        close(out, ref.rope_attention(T(q), T(k), T(v), causal=causal, **ref_kwargs))


@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention(block_size, chunking):
    """Sequences ending mid-block and on a block edge, one much longer; prefill, then decode, then a chunk."""
    Hq, Hkv, D = 9, 3, 64
    lens = [block_size, block_size + 5, 4 * block_size + 3, 1]
    table = npo.rope_table(D, 512, 100000.0)
    cache = PagedCache(num_blocks=64, block_size=block_size)
    caches = [np.full((64, block_size, Hkv, D), np.nan, np.float32) for _ in range(2)]
    ref_caches = [torch.full((64, block_size, Hkv, D), float("nan")) for _ in range(2)]
    for step in ({s: n for s, n in enumerate(lens)}, {s: 1 for s in range(len(lens))}, {0: 3, 2: 1, 3: 5}):
        meta = schedule_step(cache, step)
        n = len(meta.positions)
        q, k, v = randn(n, Hq, D), randn(n, Hkv, D), randn(n, Hkv, D)
        i32 = {name: np.array(getattr(meta, name), np.int32)
               for name in ("positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc")}
        npo.write_kv_cache(k, v, *caches, i32["slot_mapping"], cos_sin=table, positions=i32["positions"])
        out = npo.paged_attention(q, *caches, i32["block_tables"], i32["seq_lens"], cos_sin=table,
                                  query_start_loc=i32["query_start_loc"], positions=i32["positions"])
        t = {name: T(a) for name, a in i32.items()}
        ref.write_kv_cache(T(k), T(v), *ref_caches, t["slot_mapping"], cos_sin=T(table), positions=t["positions"])
        expect = ref.paged_attention(T(q), *ref_caches, t["block_tables"], t["seq_lens"], cos_sin=T(table),
                                     query_start_loc=t["query_start_loc"], positions=t["positions"])
        close(out, expect)
        np.testing.assert_allclose(caches[0], ref_caches[0].numpy(), rtol=1e-6, atol=1e-6)  # NaN where unwritten
        np.testing.assert_array_equal(caches[1], ref_caches[1].numpy())


def test_write_kv_cache_skips_negative_slots():
    k_cache = np.full((2, 4, 1, 8), np.nan, np.float32)
    v_cache = k_cache.copy()
    k, v = randn(3, 1, 8), randn(3, 1, 8)
    npo.write_kv_cache(k, v, k_cache, v_cache, np.array([5, -1, 0], np.int32))
    np.testing.assert_array_equal(k_cache[1, 1], k[0])
    np.testing.assert_array_equal(v_cache[0, 0], v[2])
    assert np.isnan(k_cache).sum() == (8 - 2) * 8


def test_cross_attention():
    q, k, v = randn(3, 3, 9, 64), randn(3, 10, 3, 64), randn(3, 10, 3, 64)
    kv_lens = np.array([10, 4, 0])  # all image tokens, some, none
    close(npo.cross_attention(q, k, v, kv_lens=kv_lens), ref.cross_attention(T(q), T(k), T(v), kv_lens=T(kv_lens)))
