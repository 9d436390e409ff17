"""int4 products with x rounded to int8 per 32-element block (the C++ int4_gemm_int8, AVX512-VNNI) against the
same arithmetic in NumPy, and the fused decode step with int8 activations against the float32 decode."""
from __future__ import annotations

import numpy as np
import pytest

from smolvlm_fast.cpu import linear as cpu_linear

from smolvlm_fast.formats import int4 as int4_format

_cpu = cpu_linear._cpu
RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)


def has_int8_path() -> bool:
    if _cpu is None:
        return False
    w = int4_format.quantize_int4(RNG.standard_normal((4, 32)).astype(np.float32), 32)
    return bool(_cpu.int4_gemm(np.ones((1, 32), np.float32), w.qweight, w.scales, w.mins, 32,
                               np.empty((1, 4), np.float32), True))


pytestmark = pytest.mark.skipif(not has_int8_path(), reason="no C++ int4 x int8 kernel (needs AVX512-VNNI)")


def int8_reference(x: np.ndarray, w: int4_format.Int4Weight) -> np.ndarray:
    """x [M, K] rounded as the kernel rounds it (per 32-block: q = rint(x * (127 / max|x|)), s = max|x| / 127),
    then exactly x_rounded @ dequantize(w).T in float64."""
    M, K = x.shape
    blocks = x.reshape(M, K // 32, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)  # [M, K/32, 1]
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv)  # float32 products, rounded half to even as the kernel's cvtps2dq
    s = (amax / np.float32(127)).astype(np.float32)
    x_rounded = (q.astype(np.float64) * s).reshape(M, K)
    return x_rounded @ int4_format.dequantize(w).astype(np.float64).T


@pytest.mark.parametrize("N,K,group_size,symmetric", [
    (960, 576, 32, False), (576, 1536, 64, True), (70, 640, 128, False), (33, 96, 32, True), (5, 160, 32, False),
    (13, 224, 32, False),  # K / 32 = 7 blocks: a chunk of 4 blocks and a partial one of 3
])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 9])
def test_int4_int8_matches_its_arithmetic(N, K, group_size, symmetric, M):
    w = int4_format.quantize_int4(RNG.standard_normal((N, K)).astype(np.float32), group_size, symmetric)
    x = RNG.standard_normal((M, K)).astype(np.float32) * RNG.uniform(0.1, 10, (M, 1)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    out = np.full((M, N), np.nan, np.float32)
    assert _cpu.int4_gemm(x, w.qweight, w.scales, w.mins, group_size, out, True)
    expect = int8_reference(x, w)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())
    # and it is a different result from the float32 product, close to it
    dense = int4_format.dequantize(w)
    exact = x @ dense.T
    assert not np.array_equal(out, exact)
    # the rounding error is relative to the size of the terms summed, not to the sum: a few outputs (N = 5) may
    # cancel to small values
    assert np.abs(out - exact).max() <= 0.02 * (np.abs(x) @ np.abs(dense).T).max()


def test_fused_with_int8_activations_stays_close(tiny_llama):
    from smolvlm_fast.cpu import decoder as cpu_decoder
    from tests.test_cpu_decoder import run_steps
    from smolvlm_fast.models.smolvlm_numpy import NumpyModel

    if not cpu_decoder.available():
        pytest.skip("no fused decode step")
    exact = NumpyModel.from_checkpoint(tiny_llama, quantize="int4", int8_activations=False)
    fast = NumpyModel.from_checkpoint(tiny_llama, quantize="int4", int8_activations=True)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 300, n).tolist() for n in (40, 57, 99)]  # >= 32 tokens: float32 prefill products
    exact_logits, _ = run_steps(exact, prompts, 1, 16, fused=True)
    fast_logits, _ = run_steps(fast, prompts, 1, 16, fused=True)
    # products with 32 rows or more stay float32, so these prefills agree and the first decode step (the same
    # tokens in both) is where int8 shows
    np.testing.assert_array_equal(fast_logits[0], exact_logits[0])
    scale = np.abs(exact_logits[1]).max()
    diff = np.abs(fast_logits[1] - exact_logits[1]).max()
    assert 0 < diff <= 0.05 * scale  # used (differs), and close
