"""The int4 weight format (and GGUF's Q8_0, kept as it is), in NumPy only: quantize, dequantize and GGUF
conversion (cpu/linear.py is the product that reads it).

Int4Weight layout (the one place it is written down; the C++, Triton and CUDA kernels read it as is):

    qweight  uint8   [N, K // 2]           each row: K/32 blocks of 32 elements in 16 bytes; byte j of a block
                                           holds element j in its low nibble and element j + 16 in its high nibble
                                           (GGUF's order, so GGUF Q4_0 / Q4_1 blocks convert by plain copy)
    scales   float16 [N, K // group_size]  d, one per group of `group_size` elements along K
    mins     float16 [N, K // group_size]  m, asymmetric only (None when symmetric)

    asymmetric (GGUF Q4_1 at group 32):  w[n, k] = d[n, g] * q[n, k] + m[n, g],  q in 0..15
    symmetric  (GGUF Q4_0 at group 32):  w[n, k] = d[n, g] * (q[n, k] - 8)
    with g = k // group_size; group_size in {32, 64, 128}; K % group_size == 0 (so K % 32 == 0).

Q8Weight is GGUF Q8_0: q int8 [N, K] and scales float16 [N, K // 32]; w[n, k] = d[n, k // 32] * q[n, k].
All arrays are C-contiguous. This module never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bf16 import Bf16Weight, dequantize_bf16

GROUP_SIZES = (32, 64, 128)


BLOCK = 32                     # elements per packed block (and per GGUF block)


GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8   # gguf.GGMLQuantizationType values


_GGUF_BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34}




@dataclass(frozen=True)
class Int4Weight:
    N: int
    K: int
    group_size: int
    symmetric: bool
    qweight: np.ndarray            # uint8 [N, K // 2]
    scales: np.ndarray             # float16 [N, K // group_size]
    mins: np.ndarray | None = None  # float16 [N, K // group_size]; None when symmetric

    def __post_init__(self):
        check_group_size(self.K, self.group_size)
        groups = (self.N, self.K // self.group_size)
        _check_array("qweight", self.qweight, np.uint8, (self.N, self.K // 2))
        _check_array("scales", self.scales, np.float16, groups)
        if self.symmetric:
            if self.mins is not None:
                raise ValueError("a symmetric Int4Weight has no mins")
        else:
            _check_array("mins", self.mins, np.float16, groups)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes + (0 if self.mins is None else self.mins.nbytes)


@dataclass(frozen=True)
class Q8Weight:
    N: int
    K: int
    q: np.ndarray       # int8 [N, K]
    scales: np.ndarray  # float16 [N, K // 32]

    def __post_init__(self):
        if self.K <= 0 or self.K % BLOCK:
            raise ValueError(f"Q8Weight: K = {self.K} is not a positive multiple of {BLOCK}")
        _check_array("q", self.q, np.int8, (self.N, self.K))
        _check_array("scales", self.scales, np.float16, (self.N, self.K // BLOCK))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes


def check_group_size(K: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    if K <= 0 or K % group_size:
        raise ValueError(f"int4: K = {K} is not a positive multiple of group_size {group_size}"
                         + (" (try group_size 32 or 64)" if K > 0 and K % 32 == 0 else ""))


def _check_array(name: str, a, dtype, shape) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, got {got}")


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 [N, K] of values 0..15 -> uint8 [N, K // 2] in the block layout above."""
    N, K = q.shape
    blocks = q.reshape(N, K // BLOCK, 2, BLOCK // 2).astype(np.uint8)  # [..., low/high half, j]
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(qweight: np.ndarray) -> np.ndarray:
    """uint8 [N, K // 2] -> uint8 [N, K] of values 0..15."""
    N, half = qweight.shape
    blocks = qweight.reshape(N, half // (BLOCK // 2), 1, BLOCK // 2)  # [N, blocks, 1, 16]
    return np.concatenate([blocks & 0x0F, blocks >> 4], axis=2).reshape(N, half * 2)


def _fp16_up(x: np.ndarray) -> np.ndarray:
    """x >= 0 rounded to float16, upward (so a scale never shrinks below what the range needs)."""
    h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _fp16_down(x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float16)
    high = h.astype(np.float32) > x
    h[high] = np.nextafter(h[high], np.float16(-np.inf))
    return h


def quantize_int4(w: np.ndarray, group_size: int = 64, symmetric: bool = False) -> Int4Weight:
    """Round-to-nearest int4 of a float [N, K] matrix; every element lands within |scale| / 2 of itself.

    Asymmetric: m = min of the group (rounded down to fp16), d = (max - m) / 15 (rounded up).
    Symmetric: the sign of d is picked so the levels -8..7 cover the group with the smaller |d|."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"quantize_int4: w must be a 2-D float array, got {w.dtype} {w.shape}")
    N, K = w.shape
    check_group_size(K, group_size)
    w = w.astype(np.float32)
    if not np.isfinite(w).all() or np.abs(w).max(initial=0) > 60000:
        raise ValueError("quantize_int4: w has elements that are not finite or beyond float16's range")
    g = w.reshape(N, K // group_size, group_size)
    lo, hi = g.min(axis=2), g.max(axis=2)
    if symmetric:
        neg, pos = np.maximum(-lo, 0), np.maximum(hi, 0)
        d_pos, d_neg = np.maximum(neg / 8, pos / 7), np.maximum(neg / 7, pos / 8)  # levels -8d..7d or -7|d|..8|d|
        d = _fp16_up(np.minimum(d_pos, d_neg))
        d = np.where(d_neg < d_pos, -d, d)
        d32 = d.astype(np.float32)[..., None]
        q = np.round(np.divide(g, d32, out=np.zeros_like(g), where=d32 != 0)) + 8
        mins = None
    else:
        m = _fp16_down(lo)
        d = _fp16_up((hi - m.astype(np.float32)) / 15)
        d32, m32 = d.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
        q = np.round(np.divide(g - m32, d32, out=np.zeros_like(g), where=d32 != 0))
        mins = m
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(N, K)
    return Int4Weight(N, K, group_size, symmetric, pack_int4(q), np.ascontiguousarray(d), mins)


def quantize_q8(w: np.ndarray) -> Q8Weight:
    """GGUF Q8_0 of a float [N, K] matrix (K a multiple of 32), as llama.cpp's quantizer makes it: per block of 32,
    d = max |w| / 127, q = w / d rounded half away from zero, d stored in float16. Every element lands within
    d / 2 + 127 |d - fp16(d)| <= 0.57 d of itself."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"quantize_q8: w must be a 2-D float array, got {w.dtype} {w.shape}")
    N, K = w.shape
    if K <= 0 or K % BLOCK:
        raise ValueError(f"quantize_q8: K = {K} is not a positive multiple of {BLOCK}")
    w = w.astype(np.float32)
    if not np.isfinite(w).all() or np.abs(w).max(initial=0) > 60000:
        raise ValueError("quantize_q8: w has elements that are not finite or beyond float16's range")
    g = w.reshape(N, K // BLOCK, BLOCK)
    d = np.abs(g).max(axis=2, keepdims=True) / 127  # [N, K / 32, 1]
    inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
    scaled = g * inv
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)  # half away from zero, as C's roundf
    return Q8Weight(N, K, q.astype(np.int8).reshape(N, K), np.ascontiguousarray(d[..., 0].astype(np.float16)))


def dequantize_int4(w: Int4Weight, rows: slice | np.ndarray | None = None) -> np.ndarray:
    """float32 [N, K] (or the selected rows)."""
    sel = slice(None) if rows is None else rows
    q = unpack_int4(w.qweight[sel]).astype(np.float32)
    n = q.shape[0]
    q = q.reshape(n, w.K // w.group_size, w.group_size)
    d = w.scales[sel].astype(np.float32)[..., None]
    if w.symmetric:
        out = d * (q - 8)
    else:
        out = d * q + w.mins[sel].astype(np.float32)[..., None]
    return out.reshape(n, w.K)


def dequantize_q8(w: Q8Weight, rows: slice | np.ndarray | None = None) -> np.ndarray:
    sel = slice(None) if rows is None else rows
    q = w.q[sel].astype(np.float32)
    n = q.shape[0]
    return (q.reshape(n, w.K // BLOCK, BLOCK) * w.scales[sel].astype(np.float32)[..., None]).reshape(n, w.K)


def dequantize(w: np.ndarray | Int4Weight | Q8Weight | Bf16Weight,
               rows: slice | np.ndarray | None = None) -> np.ndarray:
    """Any weight as float32 [N, K] (or the selected rows)."""
    if isinstance(w, Bf16Weight):
        return dequantize_bf16(w, rows)
    if isinstance(w, Int4Weight):
        return dequantize_int4(w, rows)
    if isinstance(w, Q8Weight):
        return dequantize_q8(w, rows)
    w = np.asarray(w)
    return (w if rows is None else w[rows]).astype(np.float32, copy=False)


def _ggml_type(ggml_type) -> int:
    """gguf.GGMLQuantizationType, its int value, or its name ("Q4_1")."""
    if isinstance(ggml_type, str):
        names = {"Q4_0": GGML_Q4_0, "Q4_1": GGML_Q4_1, "Q8_0": GGML_Q8_0}
        if ggml_type.upper() not in names:
            raise ValueError(f"unsupported GGML type {ggml_type!r} (only {', '.join(names)})")
        return names[ggml_type.upper()]
    return int(ggml_type)


def _gguf_blocks(raw: np.ndarray, ggml_type: int, name: str) -> np.ndarray:
    """uint8 [N, bytes per row] -> uint8 [N, K / 32, bytes per block]."""
    raw = np.asarray(raw)
    size = _GGUF_BLOCK_BYTES[ggml_type]
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] == 0 or raw.shape[1] % size:
        raise ValueError(f"{name}: raw GGUF data must be uint8 [N, K / 32 * {size}], got {raw.dtype} {raw.shape}")
    return raw.reshape(raw.shape[0], raw.shape[1] // size, size)


def int4_from_gguf(raw: np.ndarray, ggml_type) -> Int4Weight:
    """Lossless Int4Weight (group 32) from GGUF Q4_0 (symmetric) or Q4_1 (asymmetric) rows."""
    t = _ggml_type(ggml_type)
    if t not in (GGML_Q4_0, GGML_Q4_1):
        raise ValueError(f"int4_from_gguf: GGML type {ggml_type} is not Q4_0 or Q4_1")
    blocks = _gguf_blocks(raw, t, "int4_from_gguf")
    N, nb, _ = blocks.shape
    scales = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16).reshape(N, nb)
    if t == GGML_Q4_0:
        return Int4Weight(N, nb * BLOCK, BLOCK, True, np.ascontiguousarray(blocks[:, :, 2:]).reshape(N, nb * 16),
                          scales)
    mins = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16).reshape(N, nb)
    return Int4Weight(N, nb * BLOCK, BLOCK, False, np.ascontiguousarray(blocks[:, :, 4:]).reshape(N, nb * 16),
                      scales, mins)


def q8_from_gguf(raw: np.ndarray) -> Q8Weight:
    """Q8Weight from GGUF Q8_0 rows (uint8 [N, K / 32 * 34])."""
    blocks = _gguf_blocks(raw, GGML_Q8_0, "q8_from_gguf")
    N, nb, _ = blocks.shape
    scales = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16).reshape(N, nb)
    q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(N, nb * BLOCK)
    return Q8Weight(N, nb * BLOCK, q, scales)


def from_gguf(raw: np.ndarray, ggml_type) -> Int4Weight | Q8Weight:
    t = _ggml_type(ggml_type)
    return q8_from_gguf(raw) if t == GGML_Q8_0 else int4_from_gguf(raw, t)


def embedding_rows(w: np.ndarray | Int4Weight | Q8Weight | Bf16Weight, ids) -> np.ndarray:
    """float32 [len(ids), K]: the looked-up rows only, dequantized (token embeddings)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"embedding_rows: ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    n = w.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"embedding_rows: token ids must be in [0, {n}), got {ids.min()}..{ids.max()}")
    return dequantize(w, ids.astype(np.intp))
