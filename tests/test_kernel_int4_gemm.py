"""The Triton int4_gemm kernel against the PyTorch reference (dequantize, then matmul) in float64.

Without a GPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes, in fp32,
within 1e-5 relative (ops/README.md); the `gpu` cases run fp16 / bf16 on CUDA with FlashAttention's rule (at most twice
the error of torch.matmul on the same dequantized weight in the same precision) and skip elsewhere. Weights and
inputs are fresh random for every case; the output is NaN-filled before the call. Shapes cross every edge: K = 576
(not a multiple of 128, nor of the 256-wide decode tile), N not a multiple of the 32-wide tiles, M = 1 (the FMA
decode path), 3 and 16 (the tl.dot decode path), 17 and 70 (the tiled prefill path, 70 = two grouped row tiles + a
partial one), with the decode launch's K split forced to several splits.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from smolvlm_fast import ops
from smolvlm_fast.formats import int4 as int4_format
from smolvlm_fast.models.int4_linear import Int4Tensors
from smolvlm_fast.kernels.int4_gemm import choose_split_k, decode_block_k, int4_gemm
from smolvlm_fast.ops import reference

from .kernel_checks import assert_matches_fp32, run_into_nan

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")


def make_weight(N: int, K: int, group_size: int, symmetric: bool, device="cpu") -> Int4Tensors:
    """Round-to-nearest int4 of normal weights whose rows differ in scale, with a few outliers."""
    w = RNG.standard_normal((N, K), dtype=np.float32) * RNG.uniform(0.01, 0.1, (N, 1)).astype(np.float32)
    w[RNG.random((N, K)) < 0.003] *= 15
    return Int4Tensors.from_numpy(int4_format.quantize_int4(w, group_size=group_size, symmetric=symmetric), device)


def make_inputs(M, N, K, group_size, symmetric, bias, device="cpu", dtype=torch.float32):
    w = make_weight(N, K, group_size, symmetric, device)
    x = torch.randn(M, K, device=device).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return x, w, b


def expected(x, w, b):
    """The reference in float64 on the CPU."""
    cpu = Int4Tensors(w.N, w.K, w.group_size, w.symmetric, w.qweight.cpu(), w.scales.cpu(),
                      None if w.mins is None else w.mins.cpu())
    return reference.int4_gemm(x.cpu().double(), cpu, None if b is None else b.cpu().double())


# (N, K, group_size): K = 576 with groups 64 and 32 (the SmolLM2 hidden size), 256 with 128; N = 40 ends mid-tile
SHAPES = [(40, 576, 64), (40, 576, 32), (72, 256, 128)]


@needs_interpreter
@pytest.mark.parametrize("M", [1, 3, 16, 17, 70])
@pytest.mark.parametrize("N,K,group_size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference_fp32(M, N, K, group_size, symmetric, bias):
    x, w, b = make_inputs(M, N, K, group_size, symmetric, bias)
    out = run_into_nan(int4_gemm, torch.empty(M, N), x, w, b)
    assert_matches_fp32(out, expected(x, w, b))


@needs_interpreter
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("split_k", [2, 3, 5])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_split_k(M, split_k, symmetric):
    """K = 576 is 5 decode tiles of 128: 2 and 3 splits end on a partial split, 5 gives one tile each."""
    x, w, b = make_inputs(M, 40, 576, 64, symmetric, bias=True)
    out = run_into_nan(int4_gemm, torch.empty(M, 40), x, w, b, split_k=split_k)
    assert_matches_fp32(out, expected(x, w, b))


@needs_interpreter
@pytest.mark.parametrize("M", [1, 2, 20])
@pytest.mark.parametrize("K,group_size", [(960, 64), (1536, 128), (768, 32)])
def test_real_k(M, K, group_size):
    """SmolVLM's other K: 960 (a 256 decode tile with a masked 3/4 tail), 1536, and 768 (the vision width)."""
    x, w, b = make_inputs(M, 24, K, group_size, symmetric=False, bias=False)
    out = run_into_nan(int4_gemm, torch.empty(M, 24), x, w, b, split_k=2)
    assert_matches_fp32(out, expected(x, w, b))


@needs_interpreter
@pytest.mark.parametrize("M", [1, 4, 33])
def test_strided_x_and_row_slice_of_weight(M):
    """x a column slice of a wider tensor (row stride > K); the weight rows a slice of a stacked weight (qkv)."""
    wide = torch.randn(M, 700)
    x = wide[:, 50:626]  # [M, 576], stride 700
    full = make_weight(96, 576, 64, symmetric=False)
    w = Int4Tensors(40, 576, 64, False, full.qweight[30:70], full.scales[30:70], full.mins[30:70])
    out = run_into_nan(int4_gemm, torch.empty(M, 40), x, w, None)
    assert_matches_fp32(out, expected(x, w, None))


@needs_interpreter
def test_through_ops_and_empty_input():
    x, w, b = make_inputs(3, 40, 576, 32, symmetric=True, bias=True)
    with ops.prefer("triton"):
        y = ops.int4_gemm(x, w, b)
    assert "triton" in ops.available("int4_gemm")
    assert_matches_fp32(y, expected(x, w, b))
    assert int4_gemm(x[:0], w).shape == (0, 40)


def test_reference_dequantizes_like_numpy():
    for symmetric in (False, True):
        q = int4_format.quantize_int4(RNG.standard_normal((24, 576), dtype=np.float32), group_size=64, symmetric=symmetric)
        deq = reference.dequantize_int4(Int4Tensors.from_numpy(q))
        np.testing.assert_array_equal(deq.numpy(), int4_format.dequantize_int4(q))


def test_bad_arguments():
    x, w, b = make_inputs(2, 40, 576, 64, symmetric=False, bias=True)
    with pytest.raises(ValueError, match="expects K = 576"):
        int4_gemm(torch.randn(2, 512), w)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        int4_gemm(x.double(), w)
    with pytest.raises(ValueError, match="bias"):
        int4_gemm(x, w, torch.randn(41))
    with pytest.raises(ValueError, match="needs mins"):
        int4_gemm(x, Int4Tensors(40, 576, 64, False, w.qweight, w.scales, None))
    with pytest.raises(ValueError, match="scales must be float16"):
        int4_gemm(x, Int4Tensors(40, 576, 64, False, w.qweight, w.scales.float(), w.mins))
    with pytest.raises(ValueError, match="out must be"):
        int4_gemm(x, w, out=torch.empty(2, 41))


def test_launch_choices():
    assert [decode_block_k(k) for k in (576, 960, 1536, 2560, 768, 3072, 12288, 64)] == \
        [128, 256, 256, 256, 256, 256, 256, 64]
    assert choose_split_k(programs=18, k_tiles=5, device=torch.device("cpu")) == 1  # the interpreter: one split


def assert_within_twice_torch(out, x, w, b):
    """FlashAttention's rule: the error against the fp64 reference at most twice that of torch.matmul on the same
    dequantized weight in out's precision (on out's device)."""
    ref = expected(x, w, b)
    plain = x @ reference.dequantize_int4(w).to(x.dtype).T
    plain = (plain if b is None else plain + b).double().cpu()
    assert not out.isnan().any()
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= 2 * (plain - ref).abs().max().item(), f"{x.dtype}: max error {err:.3g}"


@needs_interpreter
@pytest.mark.parametrize("M", [1, 3, 17])
def test_fp16_in_the_interpreter(M):
    """fp16 x: the weights rounded to fp16 for the dot (multiplied in fp32 here), the output rounded once."""
    x, w, b = make_inputs(M, 40, 576, 64, symmetric=False, bias=True, dtype=torch.float16)
    out = run_into_nan(int4_gemm, torch.empty(M, 40, dtype=torch.float16), x, w, b)
    assert out.dtype == torch.float16
    assert_within_twice_torch(out, x, w, b)


# ---------------------------------------------------------------- GPU: fp16 / bf16 on the real shapes

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 7, 16, 300])
@pytest.mark.parametrize("N,K,group_size", [(960, 576, 64), (3072, 576, 32), (576, 1536, 128), (576, 1536, 32),
                                            (768, 3072, 64), (2560, 960, 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_low_precision_on_cuda(dtype, M, N, K, group_size, symmetric):
    x, w, b = make_inputs(M, N, K, group_size, symmetric, bias=True, device="cuda", dtype=dtype)
    out = run_into_nan(int4_gemm, torch.empty(M, N, device="cuda", dtype=dtype), x, w, b)
    assert_within_twice_torch(out, x, w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 200])
def test_fp32_on_cuda(M):
    x, w, b = make_inputs(M, 960, 576, 64, symmetric=False, bias=True, device="cuda")
    out = run_into_nan(int4_gemm, torch.empty(M, 960, device="cuda"), x, w, b)
    ref = expected(x, w, b)
    assert (out.double().cpu() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
