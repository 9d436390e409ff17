"""`linear`, the one matrix product the PyTorch-free model calls: float32, int4, Q8_0 or packed bf16 weights (their
formats: formats/int4.py, formats/bf16.py), on the C++ kernels when they are built, else
NumPy + BLAS a chunk of weight rows at a time. Also the C++ pool's thread count. This module never imports torch.
"""
from __future__ import annotations

import numpy as np

from ..formats.bf16 import Bf16Weight, round_bf16
from ..formats.int4 import Int4Weight, Q8Weight, dequantize
from .native import _cpu  # None when the extension is not built: the NumPy code runs instead

# ---------------------------------------------------------------- the product

def cpu_kernels_available() -> bool:
    return _cpu is not None


def set_num_threads(n: int) -> None:
    """Threads the C++ kernels use (default: SMOLVLM_FAST_NUM_THREADS, else the cores this process may use)."""
    if _cpu is not None:
        _cpu.set_num_threads(int(n))


def get_num_threads() -> int:
    return _cpu.get_num_threads() if _cpu is not None else 1


DECODE_ROWS = 16  # float32 products with at most this many rows of x run in C++ (see linear)


def linear(x: np.ndarray, w: np.ndarray | Int4Weight | Q8Weight | Bf16Weight,
           bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W.T (+ bias) in float32: x [..., K] -> [..., N]. Quantized weights: the C++ kernels (decode tiles for
    a few rows of x, a GEMM over dequantized L2-sized panels for many); without them, a chunk of weight rows at a
    time dequantized and multiplied by BLAS, so memory stays flat. bf16 weights: x rounded to bf16 too, float32
    sums (_cpu.bf16_gemm, bias in its epilogue)."""
    x = np.asarray(x)
    N, K = w.shape
    if x.shape[-1:] != (K,):
        raise ValueError(f"linear: x has shape {x.shape}, the weight expects [..., {K}]")
    if bias is not None and np.shape(bias) != (N,):
        raise ValueError(f"linear: bias has shape {np.shape(bias)}, expected ({N},)")
    if x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous:
        x2 = x  # the decode step's case: no copy, no reshape (a call costs a few microseconds)
    else:
        x2 = np.ascontiguousarray(x.reshape(-1, K), dtype=np.float32)  # [M, K]
    if isinstance(w, Bf16Weight):
        y = _bf16_matmul(x2, w, bias)
        bias = None  # added by the product
    elif isinstance(w, (Int4Weight, Q8Weight)):
        y = _quantized_matmul(x2, w)
    elif (_cpu is not None and x2.shape[0] <= DECODE_ROWS and isinstance(w, np.ndarray) and w.dtype == np.float32
          and w.flags.c_contiguous):
        # A decode-sized product on the C++ pool, not OpenBLAS: OpenBLAS's threads spin for a while after each call,
        # and on a small machine they then take the cores from the fused decoder's threads (37 ms -> 17 ms a token
        # for SmolVLM-256M fp32 on 2 cores once the LM head stopped calling into OpenBLAS).
        y = np.empty((x2.shape[0], N), dtype=np.float32)
        _cpu.f32_gemm(x2, w, y)
    else:
        y = x2 @ np.asarray(w, dtype=np.float32).T
    if bias is not None:
        y += bias
    return y if x.ndim == 2 else y.reshape(*x.shape[:-1], N)


def _bf16_matmul(x: np.ndarray, w: Bf16Weight, bias: np.ndarray | None) -> np.ndarray:
    out = np.empty((x.shape[0], w.N), dtype=np.float32)
    if x.shape[0] == 0:
        return out
    f32_bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    if _cpu is not None:
        _cpu.bf16_gemm(x, w.packed, w.N, w.K, f32_bias, False, False, out)
        return out
    _dequantized_matmul(round_bf16(x), w, out)
    if f32_bias is not None:
        out += f32_bias
    return out


def _quantized_matmul(x: np.ndarray, w: Int4Weight | Q8Weight) -> np.ndarray:
    M = x.shape[0]
    out = np.empty((M, w.N), dtype=np.float32)
    if M == 0:
        return out
    if _cpu is not None:
        if isinstance(w, Int4Weight):
            _cpu.int4_gemm(x, w.qweight, w.scales, w.mins, w.group_size, out)
        else:
            _cpu.q8_gemm(x, w.q, w.scales, out)
        return out
    _dequantized_matmul(x, w, out)
    return out


def _dequantized_matmul(x: np.ndarray, w, out: np.ndarray) -> None:
    """out = x @ dequantize(w).T by BLAS, a chunk of weight rows at a time (memory stays flat)."""
    rows = min(w.N, max(1, _CHUNK_ELEMENTS // w.K))
    for n0 in range(0, w.N, rows):
        n1 = min(w.N, n0 + rows)
        np.matmul(x, dequantize(w, slice(n0, n1)).T, out=out[:, n0:n1])


def cpu_linear_spec(w: np.ndarray | Int4Weight | Q8Weight | Bf16Weight, bias: np.ndarray | None = None) -> tuple:
    """A weight as the C++ decode step (_cpu.Decoder) takes it: ("int4", qweight, scales, mins, group_size, bias),
    ("q8", q, scales, bias), ("bf16", packed, N, K, bias) or ("f32", w, bias), arrays as they are (float weights
    made float32 and contiguous)."""
    f32 = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    if isinstance(w, Bf16Weight):
        return ("bf16", w.packed, w.N, w.K, f32)
    if isinstance(w, Int4Weight):
        return ("int4", w.qweight, w.scales, w.mins, w.group_size, f32)
    if isinstance(w, Q8Weight):
        return ("q8", w.q, w.scales, f32)
    return ("f32", np.ascontiguousarray(w, dtype=np.float32), f32)


_CHUNK_ELEMENTS = 1 << 20      # weight elements dequantized at a time for BLAS (4 MB of float32), without the C++
