"""The bf16 products (csrc/cpu/bf16_gemm.h: _cpu.bf16_pack, bf16_gemm, bf16_prefill_gemm) on every kernel this CPU
can run — AVX512-BF16, float32 FMAs over the packed bf16 weights, and the AMX kernel's loop with each tile
instruction emulated in software (real AMX where the CPU has it) — against float64 products.

The reference multiplies the bf16-rounded operands in float64, so the only difference left is the kernels' float32
summation: a bf16 x bf16 product is exact in float32 (8 + 8 significant bits), and each of the K additions rounds
by at most 2^-24 of a partial sum bounded by sum |x w|, so |err| <= K * 2^-24 * sum_k |x_k w_k|."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from smolvlm_fast.formats import int4 as int4_format
from smolvlm_fast.cpu.linear import cpu_linear_spec

cpu = pytest.importorskip("smolvlm_fast._cpu", reason="the C++ extension is not built (pip install -e .)")

RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)
EPS32 = 2.0**-24
ISAS = ["avx512bf16", "f32", "amx-emulated", "amx"]
GELU_SLOPE = 1.13  # max |d/dz gelu_tanh(z)|: an error in z reaches the output at most this much larger


@pytest.fixture(params=ISAS)
def isa(request):
    before = cpu.bf16_isa()
    if not cpu.bf16_set_isa(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} kernel")
    yield request.param
    cpu.bf16_set_isa(before)


def bf16(a: np.ndarray) -> np.ndarray:
    """a rounded to bf16 (torch's nearest-even conversion), as float64."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().double().numpy()


def gelu64(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def check(out, x, w, bias=None, gelu=False, before=None):
    """out against the float64 product of bf16(x) and bf16(w), within the float32 summation bound."""
    xb, wb = bf16(x), bf16(w)
    z = xb @ wb.T + (0 if bias is None else bias.astype(np.float64))  # [M, N]
    bound = (x.shape[1] + 2) * EPS32 * (np.abs(xb) @ np.abs(wb).T + (0 if bias is None else np.abs(bias)))
    if gelu:
        # gelu's own float32 evaluation: a few ulps of its output or input
        bound = GELU_SLOPE * bound + 16 * EPS32 * np.maximum(np.abs(z), 1e-30)
        z = gelu64(z)
    if before is not None:
        z = z + before
        bound = bound + EPS32 * np.abs(z)  # the one float32 addition into out
    bad = np.abs(out - z) > bound + 1e-30
    assert not np.isnan(out).any(), "an output element was never written"
    assert not bad.any(), f"{bad.sum()} elements off, worst {np.abs(out - z).max():.3g} at bound {bound.max():.3g}"


def run(x, packed, N, K, bias=None, gelu=False, accumulate=False, out=None):
    if out is None:
        out = np.full((x.shape[0], N), np.nan, np.float32)
    cpu.bf16_gemm(x, packed, N, K, bias, gelu, accumulate, out)
    return out


SHAPES = [(1, 1, 1), (2, 15, 3), (7, 16, 31), (16, 17, 32), (17, 33, 33), (33, 768, 768), (100, 2304, 768),
          (1, 768, 3072), (1100, 33, 96), (13, 3, 3072), (96, 64, 64), (97, 32, 768)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_product(isa, M, N, K):
    x = RNG.standard_normal((M, K), dtype=np.float32)
    w = RNG.standard_normal((N, K), dtype=np.float32) * 0.1
    check(run(x, cpu.bf16_pack(w), N, K), x, w)


@pytest.mark.parametrize("M,N,K", [(5, 17, 40), (40, 96, 768), (300, 3072, 64)])
def test_bias_gelu_accumulate(isa, M, N, K):
    x = RNG.standard_normal((M, K), dtype=np.float32)
    w = RNG.standard_normal((N, K), dtype=np.float32) * K**-0.5 * 3
    bias = RNG.standard_normal(N, dtype=np.float32)
    packed = cpu.bf16_pack(w)
    check(run(x, packed, N, K, bias), x, w, bias)
    check(run(x, packed, N, K, bias, gelu=True), x, w, bias, gelu=True)
    before = RNG.standard_normal((M, N), dtype=np.float32)
    out = run(x, packed, N, K, bias, gelu=True, accumulate=True, out=before.copy())
    check(out, x, w, bias, gelu=True, before=before.astype(np.float64))


def test_gelu_far_negative_and_positive(isa):
    """Large |z|: gelu -> 0 from below for z -> -inf (no cancellation into NaN or a sign flip), -> z above."""
    x = np.array([[1.0], [-1.0]], dtype=np.float32)
    w = np.array([[30.0], [3.0], [1e4]], dtype=np.float32)
    out = run(x, cpu.bf16_pack(w), 3, 1, gelu=True)
    check(out, x, w, gelu=True)
    assert (out[1] <= 0).all() and abs(out[1, 2]) < 1e-30 and out[0, 2] == np.float32(bf16(w)[2, 0])


def test_strided_rows(isa):
    """x and out may be row slices of wider arrays: the kernels honour the row strides."""
    M, N, K = 37, 40, 70
    big_x = RNG.standard_normal((M, K + 9), dtype=np.float32)
    big_out = np.full((M, N + 5), np.nan, np.float32)
    w = RNG.standard_normal((N, K), dtype=np.float32)
    cpu.bf16_gemm(big_x[:, :K], cpu.bf16_pack(w), N, K, None, False, False, big_out[:, :N])
    check(big_out[:, :N], big_x[:, :K], w)
    assert np.isnan(big_out[:, N:]).all(), "wrote past the output's columns"


def test_isas_agree_and_threads():
    """Every kernel gives the float64 reference's answer; the avx512bf16 kernel with 1 and 2 threads the same bits."""
    M, N, K = 200, 100, 300
    x = RNG.standard_normal((M, K), dtype=np.float32)
    w = RNG.standard_normal((N, K), dtype=np.float32)
    packed, before = cpu.bf16_pack(w), cpu.bf16_isa()
    try:
        for name in ISAS:
            if cpu.bf16_set_isa(name):
                check(run(x, packed, N, K), x, w)
        threads = cpu.get_num_threads()
        cpu.set_num_threads(1)
        one = run(x, packed, N, K)
        cpu.set_num_threads(2)
        np.testing.assert_array_equal(one, run(x, packed, N, K))
    finally:
        cpu.set_num_threads(threads)
        cpu.bf16_set_isa(before)


def test_pack_rounds_like_torch_and_lays_out_blocks():
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.0e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
                        1.0 + 2**-8 + 2**-20, 65504.0], dtype=np.float32)
    bits = RNG.integers(0, 2**32, 200, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([special, bits])
    N, K = 5, len(values)
    w = np.tile(values, (N, 1))  # [N, K]
    packed = cpu.bf16_pack(w)
    Kp = -(-K // 32) * 32
    assert packed.dtype == np.uint16 and packed.shape == (16 * Kp,)  # one block of 16 rows
    blocks = packed.reshape(1, Kp // 2, 16, 2)  # [nb, k pair, row, 2]
    unpacked = blocks.transpose(0, 2, 1, 3).reshape(16, Kp)  # [rows, Kp]
    want = torch.from_numpy(w).bfloat16().view(torch.int16).numpy().view(np.uint16)  # [N, K]
    got = unpacked[:N, :K]
    nan = np.isnan(w)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(torch.from_numpy(got.view(np.int16).copy()).view(torch.bfloat16).float().numpy()[nan]).all()
    assert (unpacked[N:] == 0).all() and (unpacked[:, K:] == 0).all(), "padding must be zeros"


@pytest.mark.parametrize("kind", ["f32", "asym32", "sym64", "q8"])
def test_prefill_gemm_bf16(kind):
    """The decoder's prefill product: W dequantized a panel at a time into bf16."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize as gguf_quantize

    M, N, K = 150, 70, 576
    w = RNG.standard_normal((N, K), dtype=np.float32) * 0.05
    if kind == "q8":
        weight = int4_format.q8_from_gguf(gguf_quantize(w, Q.Q8_0))
    elif kind != "f32":
        weight = int4_format.quantize_int4(w, group_size=int(kind[-2:]), symmetric=kind.startswith("sym"))
    else:
        weight = w
    dense = weight if kind == "f32" else int4_format.dequantize(weight)  # [N, K] float32
    x = RNG.standard_normal((M, K), dtype=np.float32)
    out = np.full((M, N), np.nan, np.float32)
    if not cpu.bf16_prefill_gemm(x, cpu_linear_spec(weight), out):
        pytest.skip("bf16_isa() is f32: the float32 prefill product is used instead")
    check(out, x, dense)


def test_bad_arguments():
    w = RNG.standard_normal((20, 40), dtype=np.float32)
    packed = cpu.bf16_pack(w)
    x = RNG.standard_normal((3, 40), dtype=np.float32)
    out = np.empty((3, 20), np.float32)
    bad = [
        lambda: cpu.bf16_gemm(x.astype(np.float64), packed, 20, 40, None, False, False, out),
        lambda: cpu.bf16_gemm(x, packed[:-1], 20, 40, None, False, False, out),
        lambda: cpu.bf16_gemm(x, packed, 20, 41, None, False, False, out),
        lambda: cpu.bf16_gemm(x[:, :39], packed, 20, 40, None, False, False, out),
        lambda: cpu.bf16_gemm(x, packed, 20, 40, np.zeros(19, np.float32), False, False, out),
        lambda: cpu.bf16_gemm(x, packed, 20, 40, None, False, False, np.empty((3, 21), np.float32)),
        lambda: cpu.bf16_gemm(x, packed, 20, 40, None, False, False, out.T),
        lambda: cpu.bf16_pack(w.astype(np.float16)),
        lambda: cpu.bf16_set_isa("sse2"),
    ]
    for call in bad:
        with pytest.raises((ValueError, TypeError)):
            call()


def test_isa_capped_by_environment():
    """SMOLVLM_FAST_CPU_ISA=f32 forces the fallback (what a CPU without AVX512-BF16 runs); an unknown value is
    ignored with a warning."""
    code = "from smolvlm_fast import _cpu; print(_cpu.bf16_isa())"
    env = {**os.environ, "SMOLVLM_FAST_CPU_ISA": "f32"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "f32"
    env["SMOLVLM_FAST_CPU_ISA"] = "pentium"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() in ("amx", "avx512bf16", "f32") and "pentium" in done.stderr
