"""RMSNorm, optionally fused with the residual add that precedes it (Llama's `x = x + h; y = norm(x)`).

Layout: x and residual `[..., N]` with unit stride along N (rows may be strided), weight `[N]`.
One program normalizes one row; N is padded to BLOCK_N = next_power_of_2(N) and masked.

Rounding follows the reference (transformers' LlamaRMSNorm): the residual sum is rounded to its dtype
(the sum is returned and is what gets normalized), x * rsqrt(mean(x^2) + eps) is computed in fp32 and
rounded to x's dtype, and only then multiplied by the weight (one more rounding, to the promoted dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_FUSED_SIZE = 65536  # elements of one row held in registers at once


def _covers(x, weight, eps, residual=None) -> bool:
    """rows of up to 65536 elements (MAX_FUSED_SIZE: a row is held in registers; wider ones: next)"""
    return x.shape[-1] <= MAX_FUSED_SIZE


COVERS = {"rms_norm": _covers}  # read by smolvlm_fast/ops/registry.py: which calls this kernel takes


@triton.jit
def _rms_norm_kernel(
    y_ptr, sum_ptr, x_ptr, residual_ptr, weight_ptr,  # sum_ptr: the residual sum out (x_ptr when there is none)
    N, eps,
    stride_y_row, stride_sum_row, stride_x_row, stride_residual_row,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual_row + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(sum_ptr.dtype.element_ty)  # [BLOCK_N], as torch's x + r
        tl.store(sum_ptr + row * stride_sum_row + cols, x, mask=mask)
    x = x.to(tl.float32)

    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    normed = (x * rstd).to(sum_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the reference
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y_row + cols, (weight * normed).to(y_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] -> [M, N] with unit stride along N (a view where possible)."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _rms_norm_fwd(x, weight, eps, residual):
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {n}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    block_n = triton.next_power_of_2(n)
    if block_n > MAX_FUSED_SIZE:
        raise ValueError(f"rms_norm: hidden size {n} is above the fused kernel's limit of {MAX_FUSED_SIZE}")

    x2 = _rows(x, n)  # [M, N]
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)  # [M, N]
    if residual is None:
        r2, s = x2, x2  # placeholders: the kernel neither reads nor writes them
    else:
        r2 = _rows(residual, n)
        s = torch.empty(x2.shape, dtype=sum_dtype, device=x.device)  # [M, N]
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            y, s, x2, r2, weight.contiguous(),
            n, float(eps),
            y.stride(0), s.stride(0), x2.stride(0), r2.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )
    y = y.view(x.shape)
    return y if residual is None else (y, s.view(x.shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = weight * (x * rsqrt(mean(x^2) + eps)); with residual, x + residual is normalized and (y, x + residual)
    is returned. Any float dtype; statistics in fp32."""
    return _rms_norm_fwd(x, weight, eps, residual)
