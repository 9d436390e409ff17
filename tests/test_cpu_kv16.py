"""The float16 KV cache: the C++ attention (csrc/cpu/paged_attention.cpp) widening it as it reads, the fused decoder
step (csrc/cpu/decoder_step.cpp) narrowing K/V into it, the NumPy code over it (cpu/ops.py), the dtype policy
(ops.kv_cache_dtype, NumpyModel.kv_dtype) and the checks at the border.

The attention's reference is tests/test_cpu_attention.py's float64 one, computed on the float16 values themselves:
the kernels widen them exactly and then do the float32 arithmetic of the float32 cache, so the bound is that
cache's (1e-5 relative), and on the same values the float16 cache's result equals the float32 cache's bit for bit.
The caches' unused slots and every output are NaN-poisoned (float16 keeps NaN)."""
from __future__ import annotations

import numpy as np
import pytest

from smolvlm_fast.cpu import decoder as cpu_decoder
from smolvlm_fast.cpu import ops as numpy_ops
from smolvlm_fast.engine.backend import NumpyBackend
from smolvlm_fast.engine.cache import PagedCache, schedule_step
from smolvlm_fast.errors import InputError
from smolvlm_fast.models.smolvlm_numpy import NumpyModel
from tests.test_cpu_attention import (
    close,
    decode,
    mixed_batch,
    paged_case,
    prefill,
    reference,
    threads_agree,
)

cpu = pytest.importorskip("smolvlm_fast._cpu", reason="the C++ extension is not built (pip install -e .)")

RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)


def f16_case(lens, q_lens, Hq, Hkv, Dh, block_size):
    """paged_case with its caches rounded to float16: (q, k16, v16, tables, lens, qsl)."""
    q, k_cache, v_cache, tables, lens, qsl = paged_case(lens, q_lens, Hq, Hkv, Dh, block_size)
    return q, k_cache.astype(np.float16), v_cache.astype(np.float16), tables, lens, qsl


def widened(*caches):
    return [c.astype(np.float32) for c in caches]


SHAPES = [pytest.param(Hq, Hkv, Dh, id=f"{Hq}over{Hkv}-d{Dh}")
          for Hq, Hkv, Dh in [(9, 3, 64), (15, 5, 64), (9, 3, 128), (15, 5, 128), (4, 4, 80), (6, 2, 72)]]


@pytest.mark.parametrize("block_size", [1, 7, 16])
@pytest.mark.parametrize("Hq,Hkv,Dh", SHAPES)
def test_decode_matches_reference(Hq, Hkv, Dh, block_size):
    """One key, lengths in one piece and split into pieces (merged), the image prompt's 1,100."""
    lens = [1, 17, 16, 129, 1100]
    q, k16, v16, tables, seq_lens, qsl = f16_case(lens, [1] * len(lens), Hq, Hkv, Dh, block_size)
    ours = decode(q, k16, v16, tables, seq_lens, Dh**-0.5)
    close(ours, reference(q, *widened(k16, v16), tables, seq_lens, qsl, Dh**-0.5))
    np.testing.assert_array_equal(ours, decode(q, *widened(k16, v16), tables, seq_lens, Dh**-0.5))


@pytest.mark.parametrize("block_size", [7, 16])
@pytest.mark.parametrize("Hq,Hkv,Dh", SHAPES)
def test_prefill_matches_reference(Hq, Hkv, Dh, block_size):
    """A mixed batch (whole prompts, chunks after a cached prefix, single queries, a single key)."""
    q, k16, v16, tables, lens, qsl = f16_case(*mixed_batch(block_size), Hq, Hkv, Dh, block_size)
    ours = prefill(q, k16, v16, tables, lens, qsl, Dh**-0.5)
    close(ours, reference(q, *widened(k16, v16), tables, lens, qsl, Dh**-0.5))
    np.testing.assert_array_equal(ours, prefill(q, *widened(k16, v16), tables, lens, qsl, Dh**-0.5))


def test_dense_prefill_of_one_long_sequence():
    """Not causal, 1,100 queries over 1,100 keys: many key blocks per tile."""
    q, k16, v16, tables, lens, qsl = f16_case([1100], [1100], 9, 3, 64, 16)
    out = np.full(q.shape, np.nan, np.float32)
    cpu.paged_prefill_attention(q, k16, v16, tables, lens, qsl, 0.125, out, causal=False)
    expect = np.full(q.shape, np.nan, np.float32)
    cpu.paged_prefill_attention(q, *widened(k16, v16), tables, lens, qsl, 0.125, expect, causal=False)
    np.testing.assert_array_equal(out, expect)
    assert not np.isnan(out).any()


def test_threads_give_identical_results():
    threads_agree(f16_case, [300, 1100, 1, 17])


# ---------------------------------------------------------------- the NumPy code over a float16 cache


@pytest.mark.parametrize("in_cpp", [True, False])
def test_paged_attention_over_a_float16_cache(monkeypatch, in_cpp):
    """ops.paged_attention: the C++ kernels, or (no extension) the NumPy code widening the cache as it reads."""
    q, k16, v16, tables, lens, qsl = f16_case(*mixed_batch(16), 9, 3, 64, 16)
    expect = reference(q, *widened(k16, v16), tables, lens, qsl, 0.125)
    if not in_cpp:
        monkeypatch.setattr(numpy_ops, "_cpu", None)
    close(numpy_ops.paged_attention(q, k16, v16, tables, lens, query_start_loc=qsl, scale=0.125), expect)
    dq, dk, dv, dtables, dlens, dqsl = f16_case([1, 17, 1100], [1] * 3, 9, 3, 64, 16)
    close(numpy_ops.paged_attention(dq, dk, dv, dtables, dlens, scale=0.125),
          reference(dq, *widened(dk, dv), dtables, dlens, dqsl, 0.125))
    one = f16_case([40], [1], 9, 3, 64, 16)  # one sequence: the path that attends without copying into `out`
    close(numpy_ops.paged_attention(*one[:5], scale=0.125), reference(*one[:1], *widened(*one[1:3]), *one[3:], 0.125))


def test_write_kv_cache_rounds_to_nearest_and_skips_slot_minus_one():
    k_cache = np.full((4, 8, 3, 64), np.nan, np.float16)
    v_cache = np.full_like(k_cache, np.nan)
    k = RNG.standard_normal((5, 3, 64), dtype=np.float32) * 100  # some past float16's 11 bits of precision
    v = RNG.standard_normal((5, 3, 64), dtype=np.float32)
    slots = np.array([9, -1, 0, 31, -1], np.int32)
    numpy_ops.write_kv_cache(k, v, k_cache, v_cache, slots)
    for new, cache in ((k, k_cache), (v, v_cache)):
        rows = cache.reshape(-1, 3, 64)
        np.testing.assert_array_equal(rows[[9, 0, 31]], new[[0, 2, 3]].astype(np.float16))
        written = np.zeros(len(rows), bool)
        written[[9, 0, 31]] = True
        assert np.isnan(rows[~written]).all()  # slot -1 wrote nothing anywhere


def test_kv_cache_zeros_of_each_dtype():
    for dtype in (np.float32, np.float16):
        cache = numpy_ops.kv_cache_zeros((7, 16, 3, 64), dtype)
        assert cache.dtype == dtype and cache.shape == (7, 16, 3, 64) and cache.ctypes.data % 64 == 0
        assert cache.flags.c_contiguous and cache.flags.writeable and not cache.any()
    with pytest.raises(InputError, match="dtype must be one of float32, float16"):
        numpy_ops.kv_cache_zeros((2, 16, 3, 64), np.uint16)


# ---------------------------------------------------------------- the fused decoder step


def run_steps(model: NumpyModel, prompts: list[list[int]], fused: bool, tokens=None, steps: int = 12):
    """Prefill each prompt alone, then decode them together: greedily, or fed tokens [steps, S] (another run's
    greedy choices, so that runs compare on the same sequences). Returns (logits [steps + 1, S, V], tokens
    [steps, S], caches). Slots no sequence owns hold NaN: a read past a sequence's keys shows up in the logits."""
    model.fused = fused
    cache, kv = PagedCache(num_blocks=64, block_size=16), model.allocate_kv_cache(64, 16)
    for k, v in kv:
        k.fill(np.nan)
        v.fill(np.nan)
    rows = [np.stack([model.compute_logits(model.forward(np.array(ids), schedule_step(cache, {s: len(ids)}),
                                                         kv)[-1:])[0] for s, ids in enumerate(prompts)])]
    fed = []
    for i in range(steps):
        fed.append(rows[-1].argmax(-1) if tokens is None else tokens[i])
        meta = schedule_step(cache, {s: 1 for s in range(len(prompts))})
        rows.append(model.compute_logits(model.forward(np.asarray(fed[-1]), meta, kv)))
    return np.stack(rows), np.stack(fed), kv


@pytest.mark.skipif(not cpu_decoder.available(), reason="smolvlm_fast._cpu has no fused decode step")
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_fused_step_with_a_float16_cache(tiny_llama, quantize):
    """The fused step over a float16 cache against the NumPy decoder over float32 and float16 caches, all fed the
    float32 run's greedy tokens. The fused and NumPy K/V differ by float32 rounding before they are narrowed (by
    F16C's and NumPy's casts, both to nearest even), so a value at a float16 rounding boundary can land one ulp
    apart: in the first layer, whose input is the same embedding, by at most that plus the float32 difference
    itself (1e-5 of the largest |K|, which matters for values near 0, where float16 ulps are tiny); later layers
    carry it on. So the fused float16 logits are held to twice the NumPy float16 cache's own error (+ the float32
    bound)."""
    model = NumpyModel.from_checkpoint(tiny_llama, quantize=quantize, kv_dtype="float32")
    rng = np.random.default_rng(RNG.integers(1 << 31))
    prompts = [rng.integers(3, 300, n).tolist() for n in (16, 17, 1, 99)]
    numpy32, tokens, _ = run_steps(model, prompts, fused=False)
    model.kv_dtype_option = "float16"
    numpy16, _, numpy_kv = run_steps(model, prompts, fused=False, tokens=tokens)
    fused16, _, fused_kv = run_steps(model, prompts, fused=True, tokens=tokens)
    assert fused_kv[0][0].dtype == np.float16 and np.isfinite(fused16).all()
    own = np.abs(numpy16 - numpy32).max()
    assert own > 0  # the float16 cache rounds something
    assert np.abs(fused16 - numpy32).max() <= 2 * own + 1e-5 * np.abs(numpy32).max()
    for ours, theirs in zip(fused_kv[0], numpy_kv[0]):  # layer 0's K and V
        used = ~np.isnan(theirs)
        np.testing.assert_array_equal(np.isnan(ours), ~used)  # the same slots written, no others
        ulp = np.spacing(np.abs(theirs[used])).astype(np.float32)
        f32_bound = 1e-5 * np.abs(theirs[used]).max()
        assert (np.abs(ours[used].astype(np.float32) - theirs[used]) <= ulp + f32_bound).all()
        # and rarely: float32 rounding (~2^-24 relative) lands at a float16 boundary (ulp 2^-11) ~1e-3 of the time
        assert (ours[used] != theirs[used]).mean() < 0.01


@pytest.mark.skipif(not cpu_decoder.available(), reason="smolvlm_fast._cpu has no fused decode step")
def test_fused_step_skips_slot_minus_one(tiny_llama):
    """Two decoding sequences, one in block 0 (its token to slot 1), one in block 1 whose token is not cached."""
    model = NumpyModel.from_checkpoint(tiny_llama, kv_dtype="float16")
    decoder = cpu_decoder.build_decoder(model.weights, model.config, "model.")
    kv = model.allocate_kv_cache(2, 16)
    for k, v in kv:
        for cache in (k, v):
            cache.fill(np.nan)
            cache[:, 0] = 1.0  # each sequence's key 0, written earlier
    x = RNG.standard_normal((2, model.config.text.hidden_size), dtype=np.float32)
    decoder.step(x, kv, np.array([1, 0], np.int32), np.array([1, -1], np.int32), np.array([[0], [1]], np.int32),
                 np.array([2, 1], np.int32), model.rope(8))
    assert np.isfinite(x).all()
    for k, v in kv:
        for cache in (k, v):
            assert np.isfinite(cache[0, :2]).all() and (cache[1, 0] == 1).all()  # slot 1 written, slot 16 kept
            assert np.isnan(cache[0, 2:]).all() and np.isnan(cache[1, 1:]).all()  # nothing else: -1 wrote nothing


# ---------------------------------------------------------------- the policy and the checks at the border


def test_kv_dtype_policy(tiny_llama, monkeypatch):
    monkeypatch.delenv(numpy_ops.KV_DTYPE_ENV, raising=False)
    assert numpy_ops.kv_cache_dtype() == np.float32
    assert numpy_ops.kv_cache_dtype(precision="float32") == np.float32
    assert numpy_ops.kv_cache_dtype(precision="bfloat16") == np.float16
    assert numpy_ops.kv_cache_dtype("float32", precision="bfloat16") == np.float32
    assert numpy_ops.kv_cache_dtype(precision="float32", quantized=True) == np.float16
    assert numpy_ops.kv_cache_dtype("float32", quantized=True) == np.float32
    monkeypatch.setenv(numpy_ops.KV_DTYPE_ENV, "float16")
    assert numpy_ops.kv_cache_dtype(precision="float32") == np.float16
    assert numpy_ops.kv_cache_dtype("float32") == np.float32  # an explicit option wins
    monkeypatch.setenv(numpy_ops.KV_DTYPE_ENV, "bfloat16")
    with pytest.raises(InputError, match="SMOLVLM_FAST_KV_DTYPE must be one of float32, float16"):
        numpy_ops.kv_cache_dtype()
    monkeypatch.delenv(numpy_ops.KV_DTYPE_ENV)
    with pytest.raises(InputError, match="kv_dtype must be one of"):
        NumpyModel.from_checkpoint(tiny_llama, kv_dtype="int8")
    model = NumpyModel.from_checkpoint(tiny_llama)
    assert model.kv_dtype == np.float32 and NumpyBackend().kv_itemsize(model) == 4
    model.precision = "bfloat16"  # as a bfloat16 checkpoint's model would say
    assert model.kv_dtype == np.float16 and NumpyBackend().kv_itemsize(model) == 2
    assert all(k.dtype == v.dtype == np.float16 for k, v in model.allocate_kv_cache(2, 16))
    int4 = NumpyModel.from_checkpoint(tiny_llama, quantize="int4")  # float32 precision, int4 decoder
    assert int4.precision == "float32" and int4.kv_dtype == np.float16
    assert NumpyModel.from_checkpoint(tiny_llama, quantize="int4", kv_dtype="float32").kv_dtype == np.float32


def test_python_wrappers_reject_mixed_or_wrong_cache_dtypes():
    q, k16, v16, tables, lens, qsl = f16_case([20], [1], 9, 3, 64, 16)
    k, v = RNG.standard_normal((2, 3, 64), dtype=np.float32), RNG.standard_normal((2, 3, 64), dtype=np.float32)
    slots = np.array([0, 1], np.int32)
    for k_cache, v_cache in ((k16, v16.astype(np.float32)), (k16.astype(np.float32), v16),
                             (k16.astype(np.float64), v16.astype(np.float64)),
                             (k16.view(np.uint16), v16.view(np.uint16))):  # bfloat16 bits, say
        with pytest.raises(InputError, match="must both be float32 or both float16"):
            numpy_ops.paged_attention(q, k_cache, v_cache, tables, lens)
        with pytest.raises(InputError, match="must both be float32 or both float16"):
            numpy_ops.write_kv_cache(k, v, k_cache, v_cache, slots)


def kernel_bad_cases():
    """(message, (k_cache, v_cache)) the kernels reject."""
    _, k16, v16, _, _, _ = f16_case([20, 5], [1, 1], 9, 3, 64, 16)
    k32, v32 = widened(k16, v16)
    yield "v_cache must be float16 as k_cache is, got float32", (k16, v32)
    yield "v_cache must be float32 as k_cache is, got float16", (k32, v16)
    yield "k_cache must be float32 or float16, got float64", (k32.astype(np.float64), v32.astype(np.float64))
    yield "k_cache must be float32 or float16, got uint16", (k16.view(np.uint16), v16.view(np.uint16))  # bf16 bits
    yield "k_cache must be float32 or float16, got int16", (k16.view(np.int16), v16.view(np.int16))
    yield "v_cache must have shape", (k16, v16[:-1].copy())
    yield "k_cache must be C-contiguous", (k16.transpose(1, 0, 2, 3), v16)


@pytest.mark.parametrize("entry", ["decode", "prefill"])
@pytest.mark.parametrize("message,caches", list(kernel_bad_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_kernels_reject_bad_caches(entry, message, caches):
    q, _, _, tables, lens, qsl = f16_case([20, 5], [1, 1], 9, 3, 64, 16)
    args = dict(q=q, k_cache=caches[0], v_cache=caches[1], block_tables=tables, seq_lens=lens, scale=0.125,
                out=np.empty(q.shape, np.float32))
    if entry == "prefill":
        args["query_start_loc"] = qsl
    with pytest.raises(ValueError, match=message):
        getattr(cpu, f"paged_{entry}_attention")(**args)


@pytest.mark.skipif(not cpu_decoder.available(), reason="smolvlm_fast._cpu has no fused decode step")
def test_decoder_step_rejects_bad_caches(tiny_llama):
    model = NumpyModel.from_checkpoint(tiny_llama)
    decoder = cpu_decoder.build_decoder(model.weights, model.config, "model.")
    t = model.config.text
    kv16 = [(k.astype(np.float16), v.astype(np.float16)) for k, v in model.allocate_kv_cache(4, 16)]
    args = dict(x=np.zeros((1, t.hidden_size), np.float32), positions=np.array([3], np.int32),
                slot_mapping=np.array([3], np.int32), block_tables=np.array([[0, 1]], np.int32),
                seq_lens=np.array([4], np.int32), cos_sin=model.rope(8))
    decoder.step(kv_caches=kv16, **args)  # good: float16 throughout
    mixed = [(k, v.astype(np.float32)) for k, v in kv16]
    with pytest.raises(ValueError, match="layer 0 v_cache must be float16 as k_cache is, got float32"):
        decoder.step(kv_caches=mixed, **args)
    wrong = [(k.astype(np.float64), v.astype(np.float64)) for k, v in kv16]
    with pytest.raises(ValueError, match="k_cache must be float32 or float16, got float64"):
        decoder.step(kv_caches=wrong, **args)
    read_only = [(k.copy(), v.copy()) for k, v in kv16]
    read_only[1][1].flags.writeable = False
    with pytest.raises(ValueError, match="v_cache must be writeable"):
        decoder.step(kv_caches=read_only, **args)
