"""The packed bf16 weight format that the C++ bf16 products read (csrc/cpu/bf16_gemm.h), in NumPy only: pack,
unpack, row views. A model in precision "bfloat16" keeps its decoder's products and LM head in it: half the bytes
of float32 for every decode step to read, and the layout the kernels take without a copy.

Layout (the same as bf16_gemm.h's): W [N, K] rounded to bf16 (nearest even), its rows in blocks of 16, K padded
with zeros to Kp (a multiple of 32); within a block, for each k pair the 16 rows' two values:

    packed[((nb * (Kp / 2) + kp) * 16 + j) * 2 + t] = bf16(W[nb * 16 + j, 2 * kp + t])   (0 past N or K)

packed is 1-D uint16 of ceil(N / 16) * 16 * Kp values. Rows from a multiple of 16 on are a contiguous piece of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_N, BLOCK_K = 16, 32


def padded_k(K: int) -> int:
    return -(-K // BLOCK_K) * BLOCK_K


def packed_elems(N: int, K: int) -> int:
    return -(-N // BLOCK_N) * BLOCK_N * padded_k(K)


@dataclass(frozen=True)
class Bf16Weight:
    N: int
    K: int
    packed: np.ndarray  # uint16 [packed_elems(N, K)]

    def __post_init__(self):
        if self.N < 1 or self.K < 1:
            raise ValueError(f"Bf16Weight: N and K must be >= 1, got {self.N}, {self.K}")
        p = self.packed
        if (not isinstance(p, np.ndarray) or p.dtype != np.uint16 or p.shape != (packed_elems(self.N, self.K),)
                or not p.flags.c_contiguous):
            got = f"{p.dtype} {p.shape}" if isinstance(p, np.ndarray) else type(p).__name__
            raise ValueError(f"Bf16Weight: packed must be a C-contiguous uint16 array of shape "
                             f"({packed_elems(self.N, self.K)},), got {got}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the bf16 bits (uint16) of its nearest even bf16, as torch converts; NaN stays NaN."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((b >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 (nearest even), as float32."""
    return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)


def pack_bf16(w: np.ndarray) -> Bf16Weight:
    """A float [N, K] matrix rounded to bf16 into the packed layout."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating) or 0 in w.shape:
        raise ValueError(f"pack_bf16: w must be a non-empty 2-D float array, got {w.dtype} {w.shape}")
    return pack_bf16_bits(bf16_bits(w))


def pack_bf16_bits(bits: np.ndarray) -> Bf16Weight:
    """bf16 bit patterns (uint16 [N, K], a BF16 safetensors tensor as stored) into the packed layout."""
    if bits.ndim != 2 or bits.dtype != np.uint16 or 0 in bits.shape:
        raise ValueError(f"pack_bf16_bits: bits must be a non-empty 2-D uint16 array, got {bits.dtype} {bits.shape}")
    N, K = bits.shape
    rows, Kp = -(-N // BLOCK_N) * BLOCK_N, padded_k(K)
    padded = np.zeros((rows, Kp), np.uint16)
    padded[:N, :K] = bits
    bits = padded
    blocks = bits.reshape(rows // BLOCK_N, BLOCK_N, Kp // 2, 2).transpose(0, 2, 1, 3)  # [nb, kp, j, t]
    return Bf16Weight(N, K, np.ascontiguousarray(blocks).reshape(-1))


def dequantize_bf16(w: Bf16Weight, rows: slice | np.ndarray | None = None) -> np.ndarray:
    """float32 [N, K] (or the selected rows, read alone: an embedding lookup touches only its rows): the bf16
    values exactly."""
    Kp = padded_k(w.K)
    blocks = w.packed.reshape(-1, Kp // 2, BLOCK_N, 2)  # [nb, kp, j, t]
    r = np.arange(w.N)[slice(None) if rows is None else rows]  # row numbers, bounds checked
    bits = blocks[r // BLOCK_N, :, r % BLOCK_N, :].reshape(len(r), Kp)[:, :w.K]  # [rows, K]
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_rows(w: Bf16Weight, start: int, stop: int) -> Bf16Weight | np.ndarray:
    """Rows [start, stop): a view of the packed data where start is a multiple of 16, else a float32 copy."""
    if start % BLOCK_N:
        return dequantize_bf16(w, slice(start, stop))
    Kp = padded_k(w.K)
    return Bf16Weight(stop - start, w.K, w.packed[start * Kp:start * Kp + packed_elems(stop - start, w.K)])


def stack_bf16(parts: list[Bf16Weight]) -> Bf16Weight:
    """[N_i, K] -> [sum N_i, K]: the packed pieces end to end where every N_i but the last is a multiple of 16,
    else repacked (exactly: bf16 values round to themselves)."""
    if all(p.N % BLOCK_N == 0 and p.K == parts[0].K for p in parts[:-1]) and parts[-1].K == parts[0].K:
        return Bf16Weight(sum(p.N for p in parts), parts[0].K, np.concatenate([p.packed for p in parts]))
    return pack_bf16(np.concatenate([dequantize_bf16(p) for p in parts]))


@dataclass(frozen=True)
class Bf16Bits:
    """A BF16 tensor as its file stores it (uint16 bit patterns, any shape; a view of the memory-mapped file, no
    copy), for a loader that hands it on to be packed: float32() makes its values one tensor at a time."""
    bits: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def float32(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)
