"""The C++ small ops (smolvlm_fast._cpu, csrc/cpu/small_ops.cpp): layer_norm and gelu_tanh against a float64
reference, directly and through numpy_ops (which falls back to its NumPy code), the argument checks at the border,
and the non-causal attention tiles of the vision encoder (csrc/cpu/paged_attention.cpp) at an awkward shape.

Fresh random inputs every test, outputs NaN-poisoned. Tolerances follow FlashAttention's rule against the float64
reference: the kernel's error at most twice that of the NumPy float32 code it replaces (plus a float32 rounding
floor, for shapes where NumPy happens to be exact)."""
from __future__ import annotations

import numpy as np
import pytest

from smolvlm_fast.cpu import ops as numpy_ops

cpu = pytest.importorskip("smolvlm_fast._cpu", reason="the C++ extension is not built (pip install -e .)")

RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)
EPS32 = float(np.finfo(np.float32).eps)
SHAPES = [(1, 1), (3, 17), (7, 768), (2, 5, 576), (517, 768), (129, 3077)]  # the last two: many pool chunks


def gelu64(z):
    z = z.astype(np.float64)
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def layer_norm64(x, w, b, eps):
    x = x.astype(np.float64)
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w
    return y if b is None else y + b


def no_worse_than_numpy(ours, numpy_result, ref):
    """FlashAttention's rule: max error <= 2 x NumPy's float32 max error, floored at a few float32 roundings."""
    assert ours.dtype == np.float32 and ours.shape == ref.shape and np.isfinite(ours).all()
    err, numpy_err = np.abs(ours - ref).max(), np.abs(numpy_result - ref).max()
    assert err <= 2 * numpy_err + 4 * EPS32 * np.abs(ref).max(), (err, numpy_err)


def gelu_input(shape):
    """Normal values of every scale, and the awkward ones: 0, large of both signs, around the tanh knee."""
    x = (RNG.standard_normal(shape) * RNG.choice([0.01, 1.0, 4.0], size=shape)).astype(np.float32)
    flat = x.reshape(-1)
    special = np.array([0.0, -0.0, 30.0, -30.0, 1e4, -1e4, -4.5, 3.0, 1e-30], np.float32)
    flat[RNG.permutation(flat.size)[:min(flat.size, special.size)]] = special[:flat.size]
    return x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_tanh(shape, with_bias):
    x = gelu_input(shape)
    bias = RNG.standard_normal(shape[-1], dtype=np.float32) if with_bias else None
    out = np.full(shape, np.nan, np.float32)
    cpu.gelu_tanh(x.reshape(-1, shape[-1]), bias, out.reshape(-1, shape[-1]))
    z = x if bias is None else x + bias  # float32, as the op sees it
    ref = gelu64(z)
    no_worse_than_numpy(out, numpy_ops.gelu_tanh_numpy(x, bias=bias), ref)
    # the sigmoid form keeps its accuracy where 1 + tanh cancels: within 1e-6 of |z| everywhere
    assert (np.abs(out - ref) <= 1e-6 * np.abs(z) + 1e-37).all()
    assert np.array_equal(numpy_ops.gelu_tanh(x, bias=bias), out)  # numpy_ops dispatches to the kernel


def test_gelu_tanh_edges():
    x = np.array([[np.nan, np.inf, 0.0, -0.0, 88.0, -88.0, 1e-40]], np.float32)
    out = np.full_like(x, -1.0)
    cpu.gelu_tanh(x, None, out)
    assert np.isnan(out[0, 0]) and out[0, 1] == np.inf
    assert (out[0, 2:4] == 0).all() and out[0, 4] == 88 and abs(out[0, 5]) < 1e-30 and abs(out[0, 6]) <= 1e-40


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_norm(shape, with_bias):
    D = shape[-1]
    x = (RNG.standard_normal(shape) * RNG.uniform(0.1, 5) + RNG.uniform(-3, 3)).astype(np.float32)  # mean != 0
    w = RNG.standard_normal(D, dtype=np.float32)
    b = RNG.standard_normal(D, dtype=np.float32) if with_bias else None
    eps = float(RNG.choice([1e-6, 1e-5]))
    out = np.full(shape, np.nan, np.float32)
    cpu.layer_norm(x.reshape(-1, D), w, b, eps, out.reshape(-1, D))
    no_worse_than_numpy(out, numpy_ops.layer_norm_numpy(x, w, b, eps), layer_norm64(x, w, b, eps))
    assert np.array_equal(numpy_ops.layer_norm(x, w, b, eps), out)


def test_in_place_matches_out_of_place():
    x = RNG.standard_normal((37, 200), dtype=np.float32) * 3
    w, b = RNG.standard_normal(200, dtype=np.float32), RNG.standard_normal(200, dtype=np.float32)
    for run in (lambda src, dst: cpu.gelu_tanh(src, b, dst), lambda src, dst: cpu.layer_norm(src, w, b, 1e-6, dst)):
        expect = np.full_like(x, np.nan)
        run(x, expect)
        y = x.copy()
        run(y, y)
        assert np.array_equal(y, expect)
    y = x.copy()
    assert numpy_ops.gelu_tanh(y, out=y) is y and np.array_equal(y, numpy_ops.gelu_tanh(x))


def test_numpy_ops_falls_back(monkeypatch):
    """Arrays the kernels do not take (float64, strided, empty) and a build without them: the NumPy code."""
    x = RNG.standard_normal((6, 40), dtype=np.float32)
    w, b = RNG.standard_normal(40, dtype=np.float32), RNG.standard_normal(40, dtype=np.float32)
    strided = np.asfortranarray(x)
    assert np.array_equal(numpy_ops.gelu_tanh(strided), numpy_ops.gelu_tanh_numpy(strided))
    assert np.array_equal(numpy_ops.layer_norm(strided, w, b, 1e-6), numpy_ops.layer_norm_numpy(strided, w, b, 1e-6))
    x64 = x.astype(np.float64)
    assert numpy_ops.gelu_tanh(x64).dtype == np.float64
    assert numpy_ops.gelu_tanh(np.zeros((0, 5), np.float32)).shape == (0, 5)
    out = np.full((6, 40), np.nan, np.float32)
    assert numpy_ops.gelu_tanh(x[:, ::-1], out=out) is out  # a strided input: the NumPy code writes out
    assert np.array_equal(out, numpy_ops.gelu_tanh_numpy(x[:, ::-1]))
    monkeypatch.setattr(numpy_ops, "_cpu", None)
    np.testing.assert_allclose(numpy_ops.gelu_tanh(x, bias=b), cpu_gelu(x, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(numpy_ops.layer_norm(x, w, b, 1e-6), cpu_layer_norm(x, w, b), rtol=1e-5, atol=1e-5)


def cpu_gelu(x, b):
    out = np.empty_like(x)
    cpu.gelu_tanh(x, b, out)
    return out


def cpu_layer_norm(x, w, b):
    out = np.empty_like(x)
    cpu.layer_norm(x, w, b, 1e-6, out)
    return out


def test_bad_arguments():
    x = RNG.standard_normal((4, 32), dtype=np.float32)
    w = np.ones(32, np.float32)
    out = np.empty_like(x)
    bad = [
        lambda: cpu.gelu_tanh(x.astype(np.float64), None, out),  # dtype
        lambda: cpu.gelu_tanh(x, None, np.empty((4, 31), np.float32)),  # shape
        lambda: cpu.gelu_tanh(x, np.ones(31, np.float32), out),  # bias shape
        lambda: cpu.gelu_tanh(x[:, ::2], None, out[:, :16]),  # not contiguous
        lambda: cpu.gelu_tanh(x.reshape(-1), None, out.reshape(-1)),  # not 2-D
        lambda: cpu.gelu_tanh(x[1:], None, x[:3]),  # partial overlap
        lambda: cpu.layer_norm(x, np.ones(31, np.float32), None, 1e-6, out),  # weight shape
        lambda: cpu.layer_norm(x, None, None, 1e-6, out),  # no weight
        lambda: cpu.layer_norm(x, w, None, float("nan"), out),  # eps
        lambda: cpu.layer_norm(x, w, None, 1e-6, out.astype(np.float64)),  # out dtype
        lambda: cpu.layer_norm(x, out[0], None, 1e-6, out),  # out overlaps weight
    ]
    for call in bad:
        with pytest.raises((ValueError, TypeError)):
            call()


@pytest.mark.parametrize("S,Hq,Hkv,Dh", [(300, 9, 3, 64), (131, 12, 12, 80)])
def test_dense_attention_tiles(S, Hq, Hkv, Dh):
    """Non-causal attention (the vision encoder's) in 128-row tiles: several tiles per KV head, the last one partial,
    head_dim not a multiple of the register tile, against float64."""
    q = RNG.standard_normal((2, S, Hq, Dh), dtype=np.float32)
    k = RNG.standard_normal((2, S, Hkv, Dh), dtype=np.float32) * 2
    v = RNG.standard_normal((2, S, Hkv, Dh), dtype=np.float32)
    ours = numpy_ops.rope_attention(q, k, v, causal=False)
    G = Hq // Hkv
    kk, vv = np.repeat(k, G, axis=2).astype(np.float64), np.repeat(v, G, axis=2).astype(np.float64)
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), kk) * Dh**-0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), vv)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
