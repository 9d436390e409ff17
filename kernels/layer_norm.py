"""LayerNorm over the last dimension (the SigLIP vision encoder's norm), forward only.

Layout: x `[..., N]` with unit stride along N (rows may be strided), weight and bias `[N]` or None.
One program normalizes one row; N is padded to BLOCK_N = next_power_of_2(N) and masked.
Mean, variance (biased, two-pass over the registers) and the affine transform are computed in fp32 and
rounded once to x's dtype, as torch's fused layer_norm does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_FUSED_SIZE = 65536  # elements of one row held in registers at once


def _covers(x, weight, bias, eps) -> bool:
    """rows of up to 65536 elements (MAX_FUSED_SIZE: a row is held in registers; wider ones: next)"""
    return x.shape[-1] <= MAX_FUSED_SIZE


COVERS = {"layer_norm": _covers}  # read by smolvlm_fast/ops/registry.py: which calls this kernel takes


@triton.jit
def _layer_norm_kernel(
    y_ptr, x_ptr, weight_ptr, bias_ptr,
    N, eps,
    stride_y_row, stride_x_row,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    centered = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / N + eps)
    y = centered * rstd
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _layer_norm_fwd(x, weight, bias, eps):
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (n,):
            raise ValueError(f"layer_norm: {name} shape {tuple(p.shape)} does not match hidden size {n}")
    block_n = triton.next_power_of_2(n)
    if block_n > MAX_FUSED_SIZE:
        raise ValueError(f"layer_norm: hidden size {n} is above the fused kernel's limit of {MAX_FUSED_SIZE}")

    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()  # [M, N]
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)  # [M, N]
    if x2.shape[0] > 0:
        _layer_norm_kernel[(x2.shape[0],)](
            y, x2,
            x2 if weight is None else weight.contiguous(), x2 if bias is None else bias.contiguous(),
            n, float(eps),
            y.stride(0), x2.stride(0),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
            num_warps=_num_warps(block_n),
        )
    return y.view(x.shape)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.layer_norm(x, (x.shape[-1],), weight, bias, eps), statistics in fp32, output in x's dtype."""
    return _layer_norm_fwd(x, weight, bias, eps)
