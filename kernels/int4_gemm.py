"""int4 weight-only GEMM: y [M, N] = x [M, K] @ dequantize(w).T (+ bias), fp32 accumulation, y in x's dtype.

Layout (written down once, in smolvlm_fast/formats/int4.py): qweight uint8 [N, K/2] holds K/32 blocks of 16 bytes per row,
byte j of a block holding element j in its low nibble and element j + 16 in its high nibble (GGUF's order); scales
fp16 [N, K/G]; mins fp16 [N, K/G] when asymmetric (w = d*q + m), none when symmetric (w = d*(q - 8)); G = 32/64/128.

Unpacking. A K tile of BLOCK_K elements is BLOCK_K/32 blocks, BLOCK_K/2 contiguous bytes of each weight row. The low
nibbles are the columns 32b + j and the high nibbles the columns 32b + 16 + j (j < 16), so instead of interleaving
them back the product is split in two, x[:, lo] @ w_lo + x[:, hi] @ w_hi, with x loaded at those two column sets
(runs of 16 contiguous elements). A 32-element block never straddles a group: each block has one scale (and min).

One kernel, two launch shapes (tl.constexpr switches):
- decode, M <= 16 (`_launch_decode`): 32 rows of the weight per program, K tiles of 256 / 128 / 64 by K
  (`decode_block_k`), split-K over the grid's second axis when the N tiles alone would leave SMs idle. M = 1 uses no tl.dot (FMA=True): per block, sum_j q*x in fp32 and one
  multiply by its scale, d * sum(q x) + m * sum(x) (d * (sum(q x) - 8 sum(x)) when symmetric). M = 2..16 pads to
  the 16 rows of a tl.dot. With several splits each writes fp32 partials [SPLIT_K, M, N], which `_sum_splits_kernel`
  adds in a fixed order (+ bias): deterministic, no atomics.
- prefill, M > 16 (`_launch_prefill`): BLOCK_M x BLOCK_N output tiles in grouped order (GROUP_M row tiles share the
  weight tiles in L2); each weight tile is unpacked, scaled (and shifted) in registers, rounded to x's dtype and fed
  to tl.dot. Autotuned on the GPU; one config in the interpreter.
K need not be a multiple of BLOCK_K (576 = 4.5 x 128): the tail tile is masked by whole 32-element blocks.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .tuning import space

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DECODE_MAX_M = 16       # up to this many rows of x: the decode launch
PROGRAMS_PER_SM = 2     # how many decode programs per SM the split-K choice aims for


@triton.jit
def _fma_tile(acc, x_ptr, qweight_ptr, scales_ptr, mins_ptr, offs_m, m_ok, offs_n, n_ok, kt, K,
              stride_xm, stride_qn, stride_sn,
              GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [1, BLOCK_N] += x[row, tile kt] . w[n, tile kt] without tl.dot (one row of x)."""
    NB: tl.constexpr = BLOCK_K // 32
    blk = kt * NB + tl.arange(0, NB)  # [NB] 32-element blocks along K
    blk_ok = blk < K // 32
    offs_j = tl.arange(0, 16)
    w_ok = n_ok[:, None, None] & blk_ok[None, :, None]
    q = tl.load(qweight_ptr + offs_n[:, None, None] * stride_qn + blk[None, :, None] * 16 + offs_j[None, None, :],
                mask=w_ok, other=0)  # [BLOCK_N, NB, 16] uint8
    col = blk[:, None] * 32 + offs_j[None, :]  # [NB, 16]: the low nibbles' columns; + 16 the high ones'
    x_row = x_ptr + offs_m[:, None, None] * stride_xm + col[None, :, :]
    x_ok = m_ok[:, None, None] & blk_ok[None, :, None]
    x_lo = tl.load(x_row, mask=x_ok, other=0.0).to(tl.float32)  # [1, NB, 16]
    x_hi = tl.load(x_row + 16, mask=x_ok, other=0.0).to(tl.float32)
    qx = tl.sum((q & 0xF).to(tl.float32) * x_lo + (q >> 4).to(tl.float32) * x_hi, axis=2)  # [BLOCK_N, NB]
    xsum = tl.sum(x_lo + x_hi, axis=2)  # [1, NB]
    s_ptrs = offs_n[:, None] * stride_sn + (blk * 32 // GROUP_SIZE)[None, :]  # [BLOCK_N, NB]
    s_ok = n_ok[:, None] & blk_ok[None, :]
    d = tl.load(scales_ptr + s_ptrs, mask=s_ok, other=0.0).to(tl.float32)
    if SYMMETRIC:
        part = d * (qx - 8.0 * xsum)
    else:
        part = d * qx + tl.load(mins_ptr + s_ptrs, mask=s_ok, other=0.0).to(tl.float32) * xsum
    return acc + tl.sum(part, axis=1)[None, :]


@triton.jit
def _dequant_half(q, d, m, SYMMETRIC: tl.constexpr):
    """Nibbles (uint8 0..15) of one half of the tile -> weights in fp32."""
    if SYMMETRIC:
        w = (q.to(tl.float32) - 8.0) * d
    else:
        w = q.to(tl.float32) * d + m
    return w


@triton.jit
def _dot_tile(acc, x_ptr, qweight_ptr, scales_ptr, mins_ptr, offs_m, m_ok, offs_n, n_ok, kt, K,
              stride_xm, stride_qn, stride_sn,
              GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_K: tl.constexpr,
              DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x[rows, tile kt] @ w[n, tile kt].T through two tl.dot (low and high nibbles)."""
    HALF: tl.constexpr = BLOCK_K // 2
    offs_i = tl.arange(0, HALF)  # byte i of the tile: block i // 16, position i % 16
    block_start = kt * BLOCK_K + (offs_i // 16) * 32  # [HALF] first column of byte i's block
    i_ok = block_start < K
    col = block_start + offs_i % 16  # the low nibbles' columns; + 16 the high ones'
    w_ok = i_ok[:, None] & n_ok[None, :]
    q = tl.load(qweight_ptr + offs_n[None, :] * stride_qn + (kt * HALF + offs_i)[:, None],
                mask=w_ok, other=0)  # [HALF, BLOCK_N] uint8
    s_ptrs = offs_n[None, :] * stride_sn + (block_start // GROUP_SIZE)[:, None]
    d = tl.load(scales_ptr + s_ptrs, mask=w_ok, other=0.0).to(tl.float32)  # [HALF, BLOCK_N]
    m = d  # unused when symmetric
    if not SYMMETRIC:
        m = tl.load(mins_ptr + s_ptrs, mask=w_ok, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    w_lo = _dequant_half(q & 0xF, d, m, SYMMETRIC).to(dtype)  # rounded to x's dtype: the tensor cores' operand
    w_hi = _dequant_half(q >> 4, d, m, SYMMETRIC).to(dtype)
    x_row = x_ptr + offs_m[:, None] * stride_xm + col[None, :]
    x_ok = m_ok[:, None] & i_ok[None, :]
    x_lo = tl.load(x_row, mask=x_ok, other=0.0)  # [BLOCK_M, HALF]
    x_hi = tl.load(x_row + 16, mask=x_ok, other=0.0)
    if DOT_FP32:  # the interpreter's bf16 / fp16 tl.dot: the rounded operands multiplied in fp32
        w_lo, w_hi, x_lo, x_hi = w_lo.to(tl.float32), w_hi.to(tl.float32), x_lo.to(tl.float32), x_hi.to(tl.float32)
    acc = tl.dot(x_lo, w_lo, acc, input_precision=DOT_PRECISION)
    return tl.dot(x_hi, w_hi, acc, input_precision=DOT_PRECISION)


@triton.jit
def _int4_gemm_kernel(
    # pointers
    y_ptr, x_ptr, qweight_ptr, scales_ptr, mins_ptr, bias_ptr,
    # sizes
    M, N, K, k_tiles_per_split, m_class,  # m_class: the autotuning key only
    # strides
    stride_ys, stride_ym, stride_xm, stride_qn, stride_sn,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, FMA: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # output tile (grouped order: GROUP_M consecutive row tiles walk the column tiles together), then K split
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * tiles_n) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + pid % (GROUP_M * tiles_n) % rows_in_group
    pid_n = pid % (GROUP_M * tiles_n) // rows_in_group

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    kt_start = split * k_tiles_per_split
    kt_end = tl.minimum(kt_start + k_tiles_per_split, tl.cdiv(K, BLOCK_K))

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(kt_start, kt_end):
        if FMA:
            acc = _fma_tile(acc, x_ptr, qweight_ptr, scales_ptr, mins_ptr, offs_m, m_ok, offs_n, n_ok, kt, K,
                            stride_xm, stride_qn, stride_sn, GROUP_SIZE, SYMMETRIC, BLOCK_K)
        else:
            acc = _dot_tile(acc, x_ptr, qweight_ptr, scales_ptr, mins_ptr, offs_m, m_ok, offs_n, n_ok, kt, K,
                            stride_xm, stride_qn, stride_sn, GROUP_SIZE, SYMMETRIC, BLOCK_K, DOT_FP32, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + split.to(tl.int64) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def configs() -> list[triton.Config]:
    """Autotune space of the prefill launch (12 configs: tile shapes; 8 warps for the 128 x 128 tile, deeper
    pipelines for the short K tile); one config in the interpreter (GROUP_M 2 so that 70 rows make a group of two
    row tiles and a group of one)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2})]
    return space([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3 if bk == 128 else 4)
                  for bm in (32, 64, 128) for bn in (64, 128) for bk in (64, 128)],
                 pinned=[triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4,
                                       num_stages=4)])


_int4_gemm_tuned = triton.autotune(configs=configs(), key=["m_class", "N", "K", "GROUP_SIZE", "SYMMETRIC",
                                                           "HAS_BIAS"])(_int4_gemm_kernel)


@triton.jit
def _sum_splits_kernel(
    y_ptr, partial_ptr, bias_ptr,
    N, num_splits,
    stride_ym, stride_ps, stride_pm,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """y[m, n] = sum over splits of partial[s, m, n] (+ bias[n]), in split order."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(partial_ptr + s * stride_ps + row * stride_pm + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launchers

@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def decode_block_k(K: int) -> int:
    """The widest K tile (256, 128 or 64 elements) whose masked tail wastes at most 1/8 of K (K = 576: 128)."""
    for bk in (256, 128):
        if triton.cdiv(K, bk) * bk - K <= K // 8:
            return bk
    return 64


def choose_split_k(programs: int, k_tiles: int, device: torch.device) -> int:
    """Splits of K so that programs x splits fills the GPU (PROGRAMS_PER_SM per SM), each split a whole number of
    K tiles. One split on the CPU (the interpreter)."""
    return max(1, min(k_tiles, PROGRAMS_PER_SM * _num_sms(device) // programs))


def _meta(x, w):
    return dict(GROUP_SIZE=w.group_size, SYMMETRIC=bool(w.symmetric), DOT_FP32=INTERPRET and x.dtype != torch.float32,
                DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")


def _launch_decode(x, w, bias, out, split_k):
    M, K = x.shape
    N = w.N
    fma = M == 1
    block_m, block_n, block_k = (1 if fma else 16), 32, decode_block_k(K)
    tiles = triton.cdiv(N, block_n)
    k_tiles = triton.cdiv(K, block_k)
    splits = split_k or choose_split_k(tiles, k_tiles, x.device)
    per_split = triton.cdiv(k_tiles, max(1, min(splits, k_tiles)))
    splits = triton.cdiv(k_tiles, per_split)  # no empty split
    mins = w.scales if w.mins is None else w.mins
    if splits == 1:
        y, stride_ys, has_bias = out, 0, bias is not None
    else:
        y = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
        stride_ys, has_bias = y.stride(0), False
    _int4_gemm_kernel[(tiles, splits)](
        y, x, w.qweight, w.scales, mins, bias if has_bias else y,
        M, N, K, per_split, 0,
        stride_ys, y.stride(-2), x.stride(0), w.qweight.stride(0), w.scales.stride(0),
        HAS_BIAS=has_bias, FMA=fma, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=1,
        num_warps=4, **_meta(x, w),
    )
    if splits > 1:
        block = 256
        _sum_splits_kernel[(M, triton.cdiv(N, block))](
            out, y, bias if bias is not None else y,
            N, splits,
            out.stride(0), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, BLOCK=block,
        )


def _launch_prefill(x, w, bias, out):
    M, K = x.shape
    N = w.N
    mins = w.scales if w.mins is None else w.mins

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), 1)

    _int4_gemm_tuned[grid](
        out, x, w.qweight, w.scales, mins, bias if bias is not None else out,
        M, N, K, triton.cdiv(K, 32), min(triton.next_power_of_2(M), 4096),
        0, out.stride(0), x.stride(0), w.qweight.stride(0), w.scales.stride(0),
        HAS_BIAS=bias is not None, FMA=False, **_meta(x, w),
    )


def _check(x, w, bias, out):
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"int4_gemm: x must be a 2-D fp32/fp16/bf16 tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    N, K, G = w.N, w.K, w.group_size
    if x.shape[1] != K:
        raise ValueError(f"int4_gemm: x has {x.shape[1]} columns, the weight expects K = {K}")
    if G not in (32, 64, 128) or K % G:
        raise ValueError(f"int4_gemm: group_size {G} must be 32, 64 or 128 and divide K = {K}")
    if w.qweight.dtype != torch.uint8 or tuple(w.qweight.shape) != (N, K // 2) or w.qweight.stride(-1) != 1:
        raise ValueError(f"int4_gemm: qweight must be uint8 [{N}, {K // 2}] with contiguous rows, got "
                         f"{w.qweight.dtype} {tuple(w.qweight.shape)}")
    for name, t in (("scales", w.scales), ("mins", w.mins)):
        if t is None and name == "mins":
            if not w.symmetric:
                raise ValueError("int4_gemm: an asymmetric weight needs mins")
            continue
        if t.dtype != torch.float16 or tuple(t.shape) != (N, K // G) or t.stride(-1) != 1:
            raise ValueError(f"int4_gemm: {name} must be float16 [{N}, {K // G}] with contiguous rows, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if w.mins is not None and w.scales.stride() != w.mins.stride():
        raise ValueError("int4_gemm: scales and mins must have the same strides")
    if bias is not None and (tuple(bias.shape) != (N,) or not bias.is_contiguous()):
        raise ValueError(f"int4_gemm: bias must be a contiguous [{N}] tensor, got {tuple(bias.shape)}")
    if out is not None and (tuple(out.shape) != (x.shape[0], N) or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"int4_gemm: out must be {x.dtype} [{x.shape[0]}, {N}] with contiguous rows")
    tensors = [x, w.qweight, w.scales] + [t for t in (w.mins, bias, out) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("int4_gemm: x, the weight's tensors, bias and out must be on one device")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError("int4_gemm: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones)")


def int4_gemm(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
              split_k: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequantize(w).T (+ bias) in fp32, returned in x's dtype.

    w: an int4 weight on x's device (smolvlm_fast.int4_linear.Int4Tensors: N, K, group_size, symmetric, qweight,
    scales, mins). split_k forces the number of K splits of the decode launch (M <= 16); tests use it."""
    _check(x, w, bias, out)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], w.N, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    if x.shape[0] <= DECODE_MAX_M:
        _launch_decode(x, w, bias, out, split_k)
    else:
        _launch_prefill(x, w, bias, out)
    return out
