"""The panel GEMM for many rows of x (csrc/cpu/prefill_gemm.cpp, reached through int4_gemm / q8_gemm / f32_gemm
from 32 rows on) against float64 NumPy, on shapes that end mid-tile in every direction."""
from __future__ import annotations

import numpy as np
import pytest

from smolvlm_fast.cpu import linear as cpu_linear

from tests.test_cpu_kernels import cases, close, kernel, make_weight, reference

cpu = cpu_linear._cpu
pytestmark = pytest.mark.skipif(cpu is None or not hasattr(cpu, "f32_gemm"), reason="C++ kernels not built")
RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)

# N: not a multiple of the 12-row panel or of 48 (a thread's chunk); K: 576 = 2 blocks of 256 + 64, 1536 = 6 whole
# blocks, 96 = less than one block; M: 32 (one tile), 33 / 63 (a tile and a bit), 300 (two row blocks of 256)
SHAPES = [(50, 96), (200, 576), (37, 1536), (12, 128)]


@pytest.mark.parametrize("kind,M,N,K", cases(SHAPES, rows=(32, 33, 63, 300), lm_head=False))
def test_quantized_weights(kind, M, N, K):
    w = make_weight(kind, N, K)
    x = RNG.standard_normal((M, K), dtype=np.float32)
    close(kernel(x, w), reference(x, w))


@pytest.mark.parametrize("M", [1, 5, 31, 32, 77, 300])
@pytest.mark.parametrize("N,K", [(50, 96), (200, 576), (13, 1000)])  # K = 1000: not a multiple of 16 or 32
def test_float32_weights(M, N, K):
    w = RNG.standard_normal((N, K), dtype=np.float32)
    x = RNG.standard_normal((M, K), dtype=np.float32)
    out = np.full((M, N), np.nan, np.float32)
    cpu.f32_gemm(x, w, out)
    close(out, x.astype(np.float64) @ w.astype(np.float64).T)


def test_float32_weights_bad_arguments():
    x, w = np.ones((40, 64), np.float32), np.ones((8, 64), np.float32)
    with pytest.raises(ValueError, match="out must have shape"):
        cpu.f32_gemm(x, w, np.empty((40, 9), np.float32))
    with pytest.raises(ValueError, match="x must have shape"):
        cpu.f32_gemm(np.ones((40, 63), np.float32), w, np.empty((40, 8), np.float32))
    with pytest.raises(ValueError, match="w must be float32"):
        cpu.f32_gemm(x, w.astype(np.float64), np.empty((40, 8), np.float32))
