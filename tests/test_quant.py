"""The int4 format (smolvlm_fast/formats/int4.py): packing, round-to-nearest error bounds, lossless GGUF Q4_0 / Q4_1 /
Q8_0 conversion against gguf.quants, embedding rows, and `linear` on its NumPy fallback against float products.
The C++ kernels have their own tests (test_cpu_kernels.py)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from smolvlm_fast.cpu import linear as cpu_linear

from smolvlm_fast.formats import int4 as int4_format
from smolvlm_fast.formats.int4 import Int4Weight, Q8Weight

RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)


def gguf_api():
    """(GGMLQuantizationType, quantize, dequantize) of gguf-py, the GGUF tests' reference; a test that asks for it
    skips where gguf is not installed, and the others in this module still run."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    return gguf.GGMLQuantizationType, quantize, dequantize


def weights(n: int, k: int) -> np.ndarray:
    """Normal weights with rows of different scale and a few outliers, as real checkpoints have."""
    w = RNG.standard_normal((n, k), dtype=np.float32) * RNG.uniform(0.005, 0.2, (n, 1)).astype(np.float32)
    w[RNG.random((n, k)) < 0.002] *= 20
    return w


@pytest.fixture
def numpy_only(monkeypatch):
    """linear() as it runs where the C++ extension is not built."""
    monkeypatch.setattr(cpu_linear, "_cpu", None)


def test_module_never_imports_torch():
    tree = ast.parse(Path(int4_format.__file__).read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" not in imported


def test_pack_layout_is_ggufs():
    q = RNG.integers(0, 16, (3, 64), dtype=np.uint8)
    packed = int4_format.pack_int4(q)
    assert packed.shape == (3, 32) and packed.dtype == np.uint8
    for b in range(2):  # byte j of block b: element 32b + j low, 32b + j + 16 high
        block = packed[:, 16 * b:16 * (b + 1)]
        np.testing.assert_array_equal(block & 0x0F, q[:, 32 * b:32 * b + 16])
        np.testing.assert_array_equal(block >> 4, q[:, 32 * b + 16:32 * (b + 1)])
    np.testing.assert_array_equal(int4_format.unpack_int4(packed), q)


@pytest.mark.parametrize("K", [576, 1536])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_round_trip_within_half_a_step(K, group_size, symmetric):
    if K % group_size:
        pytest.skip("covered by test_group_size_must_divide_k")
    N = 48
    w = weights(N, K)
    q = int4_format.quantize_int4(w, group_size=group_size, symmetric=symmetric)
    G = K // group_size
    assert (q.N, q.K, q.group_size, q.symmetric) == (N, K, group_size, symmetric)
    assert q.qweight.shape == (N, K // 2) and q.qweight.dtype == np.uint8
    assert q.scales.shape == (N, G) and q.scales.dtype == np.float16
    assert (q.mins is None) if symmetric else (q.mins.shape == (N, G) and q.mins.dtype == np.float16)
    deq = int4_format.dequantize_int4(q)
    assert deq.dtype == np.float32 and deq.shape == (N, K)
    step = np.repeat(np.abs(q.scales.astype(np.float32)), group_size, axis=1)
    err = np.abs(w - deq)
    # float32 arithmetic, u = 2^-24: the quotient fl(fl(w - m) / d) that is rounded to a level is off by up to
    # 2u|w - m| / d, so an element next to a midpoint may take the farther level by that much; dequantizing adds u|deq|
    # (d * q is exact, + m rounds). With asymmetric groups |m| can be far above a small |w| (a few draws in 1000).
    u = np.float32(2**-24)
    m = 0 if symmetric else np.repeat(np.abs(q.mins.astype(np.float32)), group_size, axis=1)
    rounding = u * (2 * (np.abs(w) + m) + np.abs(deq) + step)
    assert (err <= step / 2 + rounding + 1e-6 * np.abs(w) + 1e-12).all(), (err / step).max()
    # round to nearest uses the levels well: the mean error is about a quarter step, not half
    assert (err / step).mean() < 0.3


@pytest.mark.parametrize("group_size", int4_format.GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_each_element_gets_its_nearest_level(group_size, symmetric):
    """Round to nearest: given the group's scale (and min), no other of the 16 levels is closer to the weight."""
    N, K = 16, 384
    w = weights(N, K)
    q = int4_format.quantize_int4(w, group_size=group_size, symmetric=symmetric)
    d = q.scales.astype(np.float32)[:, :, None, None]  # [N, groups, 1, 1]
    base = -8 * d if symmetric else q.mins.astype(np.float32)[:, :, None, None]
    levels = d * np.arange(16, dtype=np.float32) + base  # [N, groups, 1, 16]
    g = w.reshape(N, K // group_size, group_size, 1)
    closest = np.abs(g - levels).min(axis=-1).reshape(N, K)
    err = np.abs(w - int4_format.dequantize_int4(q))
    assert (err <= closest + 1e-6 * np.abs(w)).all()


def test_constant_and_zero_groups():
    w = np.zeros((2, 64), np.float32)
    w[1] = 0.37
    for symmetric in (False, True):
        deq = int4_format.dequantize_int4(int4_format.quantize_int4(w, group_size=32, symmetric=symmetric))
        np.testing.assert_allclose(deq, w, atol=1e-3)
        assert np.isfinite(deq).all()


def test_group_size_must_divide_k():
    with pytest.raises(ValueError, match="576 is not a positive multiple of group_size 128"):
        int4_format.quantize_int4(weights(4, 576), group_size=128)
    with pytest.raises(ValueError, match="group_size must be one of"):
        int4_format.quantize_int4(weights(4, 576), group_size=48)
    with pytest.raises(ValueError, match="not finite"):
        int4_format.quantize_int4(np.full((2, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match="2-D float"):
        int4_format.quantize_int4(np.ones(64, np.float32))


def test_weight_classes_check_their_arrays():
    q = int4_format.quantize_int4(weights(8, 64), group_size=32)
    with pytest.raises(ValueError, match="scales must be a C-contiguous float16"):
        Int4Weight(8, 64, 32, False, q.qweight, q.scales.astype(np.float32), q.mins)
    with pytest.raises(ValueError, match="qweight"):
        Int4Weight(8, 64, 32, False, q.qweight[:, :16], q.scales, q.mins)
    with pytest.raises(ValueError, match="mins"):
        Int4Weight(8, 64, 32, False, q.qweight, q.scales, None)
    with pytest.raises(ValueError, match="symmetric Int4Weight has no mins"):
        Int4Weight(8, 64, 32, True, q.qweight, q.scales, q.mins)
    with pytest.raises(ValueError, match="K = 48"):
        Q8Weight(2, 48, np.zeros((2, 48), np.int8), np.zeros((2, 1), np.float16))


# ---------------------------------------------------------------- GGUF

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("K", [576, 1536])
def test_int4_from_gguf_is_lossless(qtype, K):
    Q, gguf_quantize, gguf_dequantize = gguf_api()
    qtype = Q[qtype]
    raw = gguf_quantize(weights(40, K), qtype)  # uint8 [N, K / 32 * bytes per block]
    w = int4_format.int4_from_gguf(raw, qtype)
    assert (w.N, w.K, w.group_size, w.symmetric) == (40, K, 32, qtype == Q.Q4_0)
    np.testing.assert_array_equal(int4_format.dequantize_int4(w), gguf_dequantize(raw, qtype))
    assert int4_format.int4_from_gguf(raw, int(qtype)).qweight.tobytes() == w.qweight.tobytes()
    assert int4_format.from_gguf(raw, qtype.name).scales.tobytes() == w.scales.tobytes()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_from_gguf_random_blocks(qtype):
    """Arbitrary blocks, not only what gguf's quantizer writes: random nibbles, scales and mins of either sign."""
    Q, _, gguf_dequantize = gguf_api()
    qtype = Q[qtype]
    N, nb = 24, 18  # K = 576
    size = 18 if qtype == Q.Q4_0 else 20
    blocks = RNG.integers(0, 256, (N, nb, size), dtype=np.uint8)
    blocks[:, :, 0:2] = (RNG.standard_normal((N, nb)) * 0.05).astype(np.float16).view(np.uint8).reshape(N, nb, 2)
    if qtype == Q.Q4_1:
        blocks[:, :, 2:4] = (RNG.standard_normal((N, nb)) * 0.3).astype(np.float16).view(np.uint8).reshape(N, nb, 2)
    raw = blocks.reshape(N, nb * size)
    w = int4_format.int4_from_gguf(raw, qtype)
    np.testing.assert_array_equal(int4_format.dequantize_int4(w), gguf_dequantize(raw, qtype))


def test_q8_from_gguf_is_lossless():
    Q, gguf_quantize, gguf_dequantize = gguf_api()
    raw = gguf_quantize(weights(40, 576), Q.Q8_0)
    w = int4_format.q8_from_gguf(raw)
    assert w.q.dtype == np.int8 and w.q.shape == (40, 576) and w.scales.shape == (40, 18)
    expect = gguf_dequantize(raw, Q.Q8_0)
    np.testing.assert_array_equal(int4_format.dequantize_q8(w), expect)
    assert isinstance(int4_format.from_gguf(raw, Q.Q8_0), Q8Weight)
    ids = np.array([3, 0, 39, 3])
    np.testing.assert_array_equal(int4_format.embedding_rows(w, ids), expect[ids])


def test_gguf_bad_input():
    Q, gguf_quantize, _ = gguf_api()
    raw = gguf_quantize(weights(4, 64), Q.Q4_1)
    with pytest.raises(ValueError, match=r"uint8 \[N, K / 32 \* 20\]"):
        int4_format.int4_from_gguf(raw[:, :30], Q.Q4_1)
    with pytest.raises(ValueError, match="uint8"):
        int4_format.int4_from_gguf(raw.astype(np.int16), Q.Q4_1)
    with pytest.raises(ValueError, match="not Q4_0 or Q4_1"):
        int4_format.int4_from_gguf(gguf_quantize(weights(4, 64), Q.Q8_0), Q.Q8_0)
    with pytest.raises(ValueError, match="unsupported GGML type"):
        int4_format.from_gguf(raw, "Q5_0")


def test_embedding_rows():
    w = weights(50, 128)
    ids = RNG.integers(0, 50, 7)
    q4 = int4_format.quantize_int4(w, group_size=64)
    np.testing.assert_array_equal(int4_format.embedding_rows(q4, ids), int4_format.dequantize_int4(q4)[ids])
    np.testing.assert_array_equal(int4_format.embedding_rows(w, ids), w[ids])
    assert int4_format.embedding_rows(q4, np.array([], np.int64)).shape == (0, 128)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
        int4_format.embedding_rows(q4, np.array([1, 50]))
    with pytest.raises(ValueError, match="1-D integer"):
        int4_format.embedding_rows(q4, np.array([[1]]))


# ---------------------------------------------------------------- linear, NumPy fallback

def quantized(kind: str, N: int, K: int):
    w = weights(N, K)
    if kind == "q8":
        Q, gguf_quantize, _ = gguf_api()
        return int4_format.q8_from_gguf(gguf_quantize(w, Q.Q8_0))
    return int4_format.quantize_int4(w, group_size=int(kind.lstrip("asym")), symmetric=kind.startswith("sym"))


@pytest.mark.parametrize("kind", ["asym32", "asym64", "sym32", "sym128", "q8"])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_linear_numpy_fallback(numpy_only, kind, M, monkeypatch):
    monkeypatch.setattr(cpu_linear, "_CHUNK_ELEMENTS", 3000)  # several chunks of rows, the last one short
    N, K = 200, 1536 if kind == "sym128" else 576
    w = quantized(kind, N, K)
    x = RNG.standard_normal((M, K), dtype=np.float32)
    bias = RNG.standard_normal(N, dtype=np.float32)
    ref = x.astype(np.float64) @ int4_format.dequantize(w).astype(np.float64).T + bias
    y = cpu_linear.linear(x, w, bias)
    assert y.dtype == np.float32 and y.shape == (M, N)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_linear_shapes_and_float_weights(numpy_only):
    w = weights(24, 64)
    x = RNG.standard_normal((2, 3, 64), dtype=np.float32)
    np.testing.assert_allclose(cpu_linear.linear(x, w), x @ w.T, rtol=1e-6, atol=1e-6)
    q = int4_format.quantize_int4(w, group_size=32)
    y = cpu_linear.linear(x, q)
    assert y.shape == (2, 3, 24)
    np.testing.assert_allclose(y, x @ int4_format.dequantize_int4(q).T, rtol=1e-5, atol=1e-6)
    assert cpu_linear.linear(x[0, 0], q).shape == (24,)
    assert cpu_linear.linear(np.zeros((0, 64), np.float32), q).shape == (0, 24)
    np.testing.assert_allclose(cpu_linear.linear(x[:, :, ::-1].copy()[:, :, ::-1], q), y, rtol=1e-6)  # strided input
    with pytest.raises(ValueError, match=r"expects \[\.\.\., 64\]"):
        cpu_linear.linear(np.ones((2, 32), np.float32), q)
    with pytest.raises(ValueError, match="bias"):
        cpu_linear.linear(x, q, np.ones(5, np.float32))
