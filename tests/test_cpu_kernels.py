"""The C++ CPU kernels (smolvlm_fast._cpu, csrc/cpu/) against NumPy: int4 (both flavours, every group size) and
q8 products for decode and prefill shapes, dequantization, threads, and the checks at the border.

Fresh random inputs every test; outputs are NaN-poisoned so an element the kernel never writes fails. The kernels
accumulate in float32 like NumPy's matmul, so both are held to 1e-5 relative against a float64 product."""
from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

from smolvlm_fast.cpu import linear as cpu_linear

from smolvlm_fast.formats import int4 as int4_format

cpu = pytest.importorskip("smolvlm_fast._cpu", reason="the C++ extension is not built (pip install -e .)")

RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)
SHAPES = [(576, 576), (1536, 576), (576, 1536)]
KINDS = ["asym32", "asym64", "asym128", "sym32", "sym64", "sym128", "q8"]


def gguf_q8_0(w: np.ndarray) -> np.ndarray:
    """gguf-py's Q8_0 blocks of w; a test that needs them skips where gguf is not installed, the others still run."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    return quantize(w, gguf.GGMLQuantizationType.Q8_0)


def make_weight(kind: str, N: int, K: int):
    w = RNG.standard_normal((N, K), dtype=np.float32) * RNG.uniform(0.01, 0.1, (N, 1)).astype(np.float32)
    if kind == "q8":
        return int4_format.q8_from_gguf(gguf_q8_0(w))
    return int4_format.quantize_int4(w, group_size=int(kind.lstrip("asym")), symmetric=kind.startswith("sym"))


def kernel(x: np.ndarray, w) -> np.ndarray:
    """The fused kernel called directly, into a NaN-poisoned output."""
    out = np.full((x.shape[0], w.N), np.nan, np.float32)
    if isinstance(w, int4_format.Int4Weight):
        cpu.int4_gemm(x, w.qweight, w.scales, w.mins, w.group_size, out)
    else:
        cpu.q8_gemm(x, w.q, w.scales, out)
    return out


def reference(x: np.ndarray, w) -> np.ndarray:
    return x.astype(np.float64) @ int4_format.dequantize(w).astype(np.float64).T


def close(ours: np.ndarray, expect: np.ndarray, tol: float = 1e-5):
    assert ours.dtype == np.float32 and ours.shape == expect.shape
    np.testing.assert_allclose(ours, expect, rtol=tol, atol=tol * np.abs(expect).max())


def cases(shapes=SHAPES, rows=(1, 3, 16, 37), lm_head=True):
    """(kind, M, N, K) for every weight kind on every shape its group size divides."""
    for kind in KINDS:
        for N, K in shapes:
            if kind != "q8" and K % int(kind.lstrip("asym")):
                continue
            for M in rows:
                yield pytest.param(kind, M, N, K, id=f"{kind}-M{M}-{N}x{K}")
        if lm_head and kind in ("asym32", "sym64", "q8"):  # the LM head's shape, decode only
            yield pytest.param(kind, 1, 49152, 576, id=f"{kind}-M1-49152x576")


@pytest.mark.parametrize("kind,M,N,K", cases())
def test_gemm_matches_numpy(kind, M, N, K):
    w = make_weight(kind, N, K)
    x = RNG.standard_normal((M, K), dtype=np.float32)
    expect = reference(x, w)
    close(kernel(x, w), expect)
    with np.errstate(all="ignore"):
        numpy_fallback = np.asarray(x @ int4_format.dequantize(w).T)
    close(numpy_fallback, expect)


@pytest.mark.parametrize("kind", ["asym32", "sym64", "q8"])
@pytest.mark.parametrize("M", [1, 7, 31, 32, 33, 100, 300])  # both sides of the C++ switch to prefill_gemm (32)
def test_linear_on_the_kernels(kind, M):
    """linear(): the decode tiles for few rows, the panel GEMM (csrc/cpu/prefill_gemm.cpp) for many."""
    w = make_weight(kind, 300, 576)
    x = RNG.standard_normal((M, 576), dtype=np.float32)
    bias = RNG.standard_normal(300, dtype=np.float32)
    close(cpu_linear.linear(x, w, bias), reference(x, w) + bias)


@pytest.mark.parametrize("kind", ["asym32", "asym128", "sym32", "sym64"])
def test_int4_dequantize(kind):
    w = make_weight(kind, 50, 1536)
    out = np.full((50, 1536), np.nan, np.float32)
    cpu.int4_dequantize(w.qweight, w.scales, w.mins, w.group_size, out)
    close(out, int4_format.dequantize_int4(w), 1e-6)  # d * q + m may round once (FMA) instead of twice


def test_q8_dequantize():
    w = make_weight("q8", 50, 576)
    out = np.full((50, 576), np.nan, np.float32)
    cpu.q8_dequantize(w.q, w.scales, out)
    np.testing.assert_array_equal(out, int4_format.dequantize_q8(w))


@pytest.mark.parametrize("N, K", [(1, 32), (50, 576), (7, 1536)])
def test_quantize_q8_is_llama_cpps(N, K):
    """Bit for bit what gguf-py (llama.cpp's quantizer in Python) makes, zero blocks and ties included, and every
    element within the documented 0.57 d of itself."""
    w = RNG.standard_normal((N, K), dtype=np.float32) * RNG.uniform(0.01, 3, (N, 1)).astype(np.float32)
    w[0, :32] = 0  # a zero block: d = 0
    w[-1, -32:] = np.arange(32, dtype=np.float32) - 15.5  # with 127 first: d = 1, and the rest exact ties (k + 0.5)
    w[-1, -32] = 127
    ours, theirs = int4_format.quantize_q8(w), int4_format.q8_from_gguf(gguf_q8_0(w))
    np.testing.assert_array_equal(ours.q, theirs.q)
    np.testing.assert_array_equal(ours.scales.view(np.uint16), theirs.scales.view(np.uint16))
    d = np.repeat(np.abs(w).reshape(N, K // 32, 32).max(axis=2) / 127, 32, axis=1)
    assert (np.abs(int4_format.dequantize_q8(ours) - w) <= 0.57 * d + 1e-12).all()
    for bad in (w[:, :31], w[0], np.full((2, 32), np.inf, np.float32), w.astype(np.int32)):
        with pytest.raises(ValueError, match="quantize_q8"):
            int4_format.quantize_q8(bad)


def test_odd_shapes():
    """N not a multiple of the row tile, K of one block, M above one x tile."""
    for N, K, M in [(1, 32, 1), (7, 64, 9), (5, 96, 2), (13, 128, 17)]:
        for kind in ("asym32", "sym32", "q8"):
            w = make_weight(kind, N, K)
            x = RNG.standard_normal((M, K), dtype=np.float32)
            close(kernel(x, w), reference(x, w))
    w = make_weight("asym32", 9, 64)
    kernel(np.zeros((0, 64), np.float32), w)  # M = 0: nothing to do


def test_long_rows():
    """K with more groups than a tile converts at a time (64): the scales are read in chunks."""
    for kind in ("asym32", "sym64", "q8"):
        w = make_weight(kind, 10, 32 * 150)
        x = RNG.standard_normal((3, 32 * 150), dtype=np.float32)
        close(kernel(x, w), reference(x, w))


@pytest.mark.parametrize("M", [5, 300])  # the decode tiles and the panel GEMM (csrc/cpu/prefill_gemm.cpp)
def test_threads_give_identical_results(M):
    w = make_weight("asym32", 1536, 576)
    x = RNG.standard_normal((M, 576), dtype=np.float32)
    default = cpu.get_num_threads()
    try:
        cpu.set_num_threads(1)
        assert cpu.get_num_threads() == 1
        one = kernel(x, w)
        cpu.set_num_threads(3)
        np.testing.assert_array_equal(kernel(x, w), one)  # each output is computed whole by one thread
    finally:
        cpu.set_num_threads(0)
    assert cpu.get_num_threads() == default >= 1


def test_concurrent_callers():
    """Python threads call at once (the GIL is released); a caller that finds the pool busy runs on its own."""
    w = make_weight("asym32", 3072, 576)
    xs = [RNG.standard_normal((2, 576), dtype=np.float32) for _ in range(4)]
    expect = [kernel(x, w) for x in xs]
    results, errors = {}, []

    def run(i):
        try:
            for _ in range(20):
                np.testing.assert_array_equal(kernel(xs[i], w), expect[i])
            results[i] = True
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 4


def _in_child(queue):
    w = make_weight("q8", 2048, 576)
    x = RNG.standard_normal((1, 576), dtype=np.float32)
    queue.put(bool(np.allclose(kernel(x, w), reference(x, w), rtol=1e-5, atol=1e-4)))


def test_fork_after_use():
    """A forked child (the pool's workers do not exist there) computes without hanging."""
    kernel(RNG.standard_normal((1, 576), dtype=np.float32), make_weight("asym32", 2048, 576))  # start the pool
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0 and queue.get(timeout=5)


# ---------------------------------------------------------------- checks at the border

def int4_args(N=64, K=128, M=2, group_size=32):
    w = make_weight(f"asym{group_size}", N, K)
    x = RNG.standard_normal((M, K), dtype=np.float32)
    return dict(x=x, qweight=w.qweight, scales=w.scales, mins=w.mins, group_size=group_size,
                out=np.empty((M, N), np.float32))


def bad_int4_cases():
    a = int4_args()
    yield "x must be float32", dict(a, x=a["x"].astype(np.float64))
    yield "x must be C-contiguous", dict(a, x=np.asfortranarray(RNG.standard_normal((2, 128), dtype=np.float32)))
    yield r"x must be \[M, K\]", dict(a, x=a["x"][0])
    yield r"x must have shape \[2, 128\]", dict(a, x=a["x"][:, :96].copy())
    yield r"out must have shape \[2, 64\]", dict(a, out=np.empty((2, 63), np.float32))
    yield "out must be float32", dict(a, out=np.empty((2, 64), np.float64))
    read_only = np.empty((2, 64), np.float32)
    read_only.flags.writeable = False
    yield "out must be writeable", dict(a, out=read_only)
    yield "scales must be float16", dict(a, scales=a["scales"].astype(np.float32))
    yield r"scales must have shape \[64, 4\]", dict(a, scales=a["scales"][:, :3].copy())
    yield r"mins must have shape \[64, 4\]", dict(a, mins=a["mins"][:32].copy())
    yield "mins must be an array or None", dict(a, mins=3)
    yield "qweight must be uint8", dict(a, qweight=a["qweight"].view(np.int8))
    yield "qweight must be 2-D", dict(a, qweight=a["qweight"].reshape(-1))
    yield "group_size must be 32, 64 or 128", dict(a, group_size=48)
    yield "K = 96 is not a positive multiple of group_size 64", dict(
        a, qweight=np.zeros((64, 48), np.uint8), x=np.zeros((2, 96), np.float32), group_size=64)
    yield "K = 80 is not a positive multiple of group_size 32", dict(
        a, qweight=np.zeros((64, 40), np.uint8), x=np.zeros((2, 80), np.float32))
    yield "scales must be float16", dict(a, scales=a["scales"].astype(">f2"))
    buf = np.zeros(256, np.float32)
    yield "out overlaps x", dict(a, x=buf.reshape(2, 128), out=buf[:128].reshape(2, 64))


@pytest.mark.parametrize("message,args", list(bad_int4_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_int4_gemm_rejects_bad_arguments(message, args):
    with pytest.raises(ValueError, match=message):
        cpu.int4_gemm(**args)


def test_q8_and_dequantize_reject_bad_arguments():
    w = make_weight("q8", 16, 64)
    x, out = RNG.standard_normal((1, 64), dtype=np.float32), np.empty((1, 16), np.float32)
    cpu.q8_gemm(x, w.q, w.scales, out)
    with pytest.raises(ValueError, match="q must be int8"):
        cpu.q8_gemm(x, w.q.view(np.uint8), w.scales, out)
    with pytest.raises(ValueError, match=r"scales must have shape \[16, 2\]"):
        cpu.q8_gemm(x, w.q, w.scales[:, :1].copy(), out)
    with pytest.raises(ValueError, match="K = 48 is not a positive multiple of group_size 32"):
        cpu.q8_gemm(x[:, :48].copy(), w.q[:, :48].copy(), w.scales[:, :1].copy(), out)
    with pytest.raises(ValueError, match=r"out must have shape \[16, 64\]"):
        cpu.q8_dequantize(w.q, w.scales, np.empty((16, 32), np.float32))
    q4 = make_weight("sym32", 16, 64)
    with pytest.raises(ValueError, match=r"out must have shape \[16, 64\]"):
        cpu.int4_dequantize(q4.qweight, q4.scales, None, 32, np.empty((15, 64), np.float32))
    with pytest.raises(TypeError):
        cpu.int4_gemm(x, q4.qweight, q4.scales, None, "32", out)


# ---------------------------------------------------------------- paged decode attention

from smolvlm_fast.cpu import ops as numpy_ops  # noqa: E402
from tests.test_cpu_attention import paged_case as paged_attention_case  # noqa: E402


def paged_case(lens, Hq, Hkv, Dh, block_size):
    """q [S, Hq, Dh] (one query per sequence) and NaN-poisoned caches whose used slots (through shuffled block
    tables) hold random rows: test_cpu_attention's case for decode."""
    return paged_attention_case(lens, [1] * len(lens), Hq, Hkv, Dh, block_size)[:5]


def decode_rows(q, k_cache, v_cache, tables, lens, scale):
    """For each (sequence s, query head h) of a decode step, in float64: (s, h, the softmax p [n], the head's keys
    [n, Dh] and values [n, Dh] gathered from the paged cache, its query [Dh])."""
    S, Hq, Dh = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    for s, n in enumerate(lens):
        slots = np.arange(n)
        k = k_cache[tables[s, slots // block_size], slots % block_size].astype(np.float64)  # [n, Hkv, Dh]
        v = v_cache[tables[s, slots // block_size], slots % block_size].astype(np.float64)
        for h in range(Hq):
            kh, qh = h // (Hq // Hkv), q[s, h].astype(np.float64)
            scores = k[:, kh] @ qh * scale
            p = np.exp(scores - scores.max())
            yield s, h, p / p.sum(), k[:, kh], v[:, kh], qh


def paged_reference(q, k_cache, v_cache, tables, lens, scale):
    out = np.empty(q.shape, np.float64)
    for s, h, p, _k, v, _q in decode_rows(q, k_cache, v_cache, tables, lens, scale):
        out[s, h] = p @ v
    return out


def score_rounding(q, k_cache, v_cache, tables, lens, scale):
    """[S, Hq, Dh]: how far the float32 rounding of the scores alone may move each output of decode attention.

    A score is a Dh-term float32 dot product, scaled: off by at most err_j = gamma * |scale| * sum_i |q_i k_ji|
    (Higham's bound, gamma = n u / (1 - n u), n = Dh + 2 operations, u = 2^-24). An output o = sum_j p_j v_j moves
    by d o / d s_j = p_j (v_j - o) per unit of score j, so by at most sum_j p_j |v_j - o| err_j. That is nothing in
    a one-hot or flat row and large only where a row's top scores nearly tie; at scale 40 (scores in the thousands)
    such rows come up in about 1 draw in 13 and miss 1e-5 relative by up to 6x (0.01x of this bound)."""
    n = q.shape[-1] + 2
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    out = np.empty(q.shape, np.float64)
    for s, h, p, k, v, qh in decode_rows(q, k_cache, v_cache, tables, lens, scale):
        err = gamma * abs(scale) * (np.abs(k) @ np.abs(qh))  # [n]
        out[s, h] = (p * err) @ np.abs(v - p @ v)
    return out


def paged_decode(q, k_cache, v_cache, tables, lens, scale):
    out = np.full(q.shape, np.nan, np.float32)
    cpu.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, out)
    return out


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("Hq,Hkv,Dh", [(9, 3, 64), (15, 5, 64), (9, 3, 80), (15, 5, 80)])
def test_paged_decode_attention_matches_numpy(block_size, Hq, Hkv, Dh, monkeypatch):
    B = block_size
    lens = [1, B // 2 + 3, B, 2 * B, 3 * B + 5, 517, B - 1, B + 1]  # mid-block, on an edge, a single key
    q, k_cache, v_cache, tables, seq_lens = paged_case(lens, Hq, Hkv, Dh, block_size)
    scale = Dh**-0.5
    ours = paged_decode(q, k_cache, v_cache, tables, seq_lens, scale)
    expect = paged_reference(q, k_cache, v_cache, tables, seq_lens, scale)
    close(ours, expect)
    monkeypatch.setattr(numpy_ops, "_cpu", None)  # the NumPy code the kernel replaces
    numpy_out = numpy_ops.paged_attention(q, k_cache, v_cache, tables, seq_lens)
    close(numpy_out, expect)
    close(ours, numpy_out.astype(np.float64))
    for s in range(len(lens)):  # each sequence alone, too (one chunk per KV head)
        one = paged_decode(q[s:s + 1].copy(), k_cache, v_cache, tables[s:s + 1].copy(), seq_lens[s:s + 1].copy(), scale)
        np.testing.assert_array_equal(one[0], ours[s])


@pytest.mark.parametrize("scale", [0.0, 1e-3, 3.0, 40.0])
def test_paged_decode_attention_any_scale(scale):
    """Flat softmax (0) to nearly one-hot (exp underflowing to 0 for most keys): within 1e-5 relative, plus what
    the float32 rounding of the scores may move each output (score_rounding: the near-ties of large scales)."""
    case = paged_case([1, 37, 300], 9, 3, 64, 32)
    ours, expect = paged_decode(*case, scale), paged_reference(*case, scale)
    assert ours.dtype == np.float32 and ours.shape == expect.shape
    limit = 1e-5 * (np.abs(expect).max() + np.abs(expect)) + score_rounding(*case, scale)
    over = np.abs(ours - expect) / limit
    assert (over <= 1).all(), f"error {over.max():.3g}x its bound at {np.unravel_index(over.argmax(), over.shape)}"


def test_paged_attention_routes_decode_to_the_kernel(monkeypatch):
    q, k_cache, v_cache, tables, seq_lens = paged_case([40, 7, 33], 9, 3, 64, 16)
    calls = []
    real = cpu.paged_decode_attention
    spy = type("Spy", (), {"paged_decode_attention": staticmethod(lambda *a: calls.append(1) or real(*a))})
    monkeypatch.setattr(numpy_ops, "_cpu", spy)
    expect = paged_reference(q, k_cache, v_cache, tables, seq_lens, 64**-0.5)
    close(numpy_ops.paged_attention(q, k_cache, v_cache, tables, seq_lens), expect)
    qsl = np.arange(4, dtype=np.int32)
    close(numpy_ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, query_start_loc=qsl), expect)
    assert len(calls) == 2
    # a prefill chunk (two queries for the first sequence) stays on the NumPy code
    q2 = RNG.standard_normal((4, 9, 64), dtype=np.float32)
    numpy_ops.paged_attention(q2, k_cache, v_cache, tables, seq_lens, query_start_loc=np.array([0, 2, 3, 4], np.int32))
    assert len(calls) == 2


def test_paged_decode_threads_give_identical_results():
    q, k_cache, v_cache, tables, seq_lens = paged_case([300, 517, 64, 129], 9, 3, 64, 16)
    before = cpu.get_num_threads()
    try:
        cpu.set_num_threads(1)
        one = paged_decode(q, k_cache, v_cache, tables, seq_lens, 0.125)
        cpu.set_num_threads(3)
        three = paged_decode(q, k_cache, v_cache, tables, seq_lens, 0.125)
    finally:
        cpu.set_num_threads(before)
    np.testing.assert_array_equal(one, three)


POOL_STRESS = """
import sys, time
import numpy as np
from smolvlm_fast import _cpu
_cpu.set_num_threads(2)
rng = np.random.default_rng(0)
qkv = rng.standard_normal((260, 384), dtype=np.float32)
out = np.empty((260, 128), np.float32)
x = rng.standard_normal((40, 64), dtype=np.float32)
w = _cpu.bf16_pack(rng.standard_normal((64, 64), dtype=np.float32))
y = np.empty((40, 64), np.float32)
end = time.time() + float(sys.argv[1])
while time.time() < end:  # a job of many chunks, then one of few, as fast as they go
    _cpu.vision_attention(qkv, 2, 130, 2, None, out)
    _cpu.bf16_gemm(x, w, 64, 64, None, False, False, y)
print("ok")
"""


def test_pool_survives_jobs_of_alternating_sizes():
    """Back-to-back parallel jobs of different chunk counts, for 10 s in a child process. The pool used to let a
    worker holding a stale ticket of the last job win its swap on the next one (it compared the stale index with
    the new, larger chunk count): a chunk of no job, then a wait that never ended. That hung this loop within 10 s
    every time on a 2-core VM."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", POOL_STRESS, "10"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
