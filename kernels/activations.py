"""Elementwise activations: silu_and_mul (SwiGLU, the Llama MLP) and gelu_tanh (the SigLIP MLP).

Layout: rows of the input `[M, C_in]` with unit stride along the columns; the output `[M, C]` is contiguous.
Gated (silu_and_mul): C_in = 2C, out[m, c] = act(in[m, c]) * in[m, C + c] (first half gate, second half up).
Plain (gelu_tanh): C_in = C, out[m, c] = act(in[m, c]); a contiguous input is treated as one long row.
A 1-D grid of M * cdiv(C, BLOCK) programs, each doing BLOCK columns of one row; math in fp32, one rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))  # x * sigmoid(x); exp(-x) = inf for x << 0 gives -0, never NaN


@triton.jit
def _gelu_tanh(x):
    # 0.5 * x * (1 + tanh(u)) with 1 + tanh(u) = 2 * sigmoid(2u): x * sigmoid(2u), no cancellation for x < 0
    u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _activation_kernel(
    out_ptr, in_ptr,
    n_cols, n_col_blocks,
    stride_out_row, stride_in_row,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols

    x = tl.load(in_ptr + row * stride_in_row + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "silu":
        y = _silu(x)
    else:  # "gelu_tanh"
        y = _gelu_tanh(x)
    if GATED:
        y = y * tl.load(in_ptr + row * stride_in_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x2: torch.Tensor, out: torch.Tensor, activation: str, gated: bool) -> None:
    """x2 [M, C_in] (unit column stride) -> out [M, C]."""
    rows, n_cols = out.shape
    n_col_blocks = triton.cdiv(n_cols, BLOCK)
    if rows * n_col_blocks == 0:
        return
    _activation_kernel[(rows * n_col_blocks,)](
        out, x2,
        n_cols, n_col_blocks,
        out.stride(0), x2.stride(0),
        ACTIVATION=activation, GATED=gated, BLOCK=BLOCK, num_warps=4,
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]  [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dimension {x.shape[-1]} is not even")
    inner = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()  # [M, 2I]
    out = torch.empty((x2.shape[0], inner), dtype=x.dtype, device=x.device)  # [M, I]
    _launch(x2, out, "silu", gated=True)
    return out.view(*x.shape[:-1], inner)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), any shape."""
    x2 = x.reshape(1, -1) if x.is_contiguous() else x.contiguous().view(1, -1)  # [1, numel]
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch(x2, out, "gelu_tanh", gated=False)
    return out.view(x.shape)
