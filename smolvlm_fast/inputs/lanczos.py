"""The uint8 Lanczos-3 resize transformers' video processor runs (torchvision's `resize`, which on the CPU is torch's
`interpolate(mode="lanczos", antialias=True)` on uint8), in NumPy, so that video frames match bit for bit.

It is not PIL's LANCZOS: torch rounds its per-axis weights to int16 with a precision chosen from the largest weight
(`_compute_index_ranges_int16_weights` in ATen's UpSampleKernel.cpp), PIL to 22 bits; about 1% of pixels differ by
one level. Per axis, in float64:
  scale = in / out; support = 3 * scale when shrinking, else 3; taps = ceil(support) * 2 + 1;
  output i: center = scale * (i + 0.5), first input xmin = max(int(center - support + 0.5), 0),
  count = min(int(center + support + 0.5), in) - xmin (at most taps),
  w_j = lanczos3((xmin + j - center + 0.5) / max(scale, 1)), normalized to sum 1;
  precision p = the largest p < 22 with round(max w * 2^(p+1)) < 2^15; weights round(w * 2^p) (half away from 0).
Then the width pass and the height pass, each (2^(p-1) + sum w_j x_j) >> p clipped to [0, 255] into uint8.
"""
from __future__ import annotations

import math

import numpy as np

SUPPORT = 3.0  # Lanczos-3: half the width of the filter, in input pixels at scale 1


def lanczos3(x: np.ndarray) -> np.ndarray:
    """sinc(x) * sinc(x / 3) for |x| < 3, else 0 (float64)."""
    x = np.abs(x)
    return np.where(x < SUPPORT, np.sinc(x) * np.sinc(x / SUPPORT), 0.0)


def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(input index per output and tap [out, taps] int64, int16-valued weights [out, taps] int64, precision)."""
    scale = in_size / out_size
    support = SUPPORT * scale if scale >= 1.0 else SUPPORT
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size) + 0.5)  # [out] float64, as ATen computes it per output
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C++'s int cast truncates, as astype does
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, taps)
    j = np.arange(taps)
    valid = j[None, :] < count[:, None]  # [out, taps]
    w = np.where(valid, lanczos3((j[None, :] + xmin[:, None] - center[:, None] + 0.5) * invscale), 0.0)
    total = _ordered_sum(w)  # summed in order, as ATen does, so the normalized weights round the same
    w = np.divide(w, total[:, None], out=w.copy(), where=total[:, None] != 0.0)
    index = np.where(valid, xmin[:, None] + j[None, :], 0)
    precision = _precision(float(w.max(initial=0.0)))
    scaled = w * (1 << precision)
    return index, np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64), precision


def _ordered_sum(w: np.ndarray) -> np.ndarray:
    """Row sums added left to right (np.sum pairs them up, which can differ in the last bit)."""
    total = np.zeros(w.shape[0])
    for k in range(w.shape[1]):
        total += w[:, k]
    return total


def _precision(w_max: float) -> int:
    for p in range(22):
        if int(0.5 + w_max * (1 << (p + 1))) >= 1 << 15:
            return p
    return 22


def _resize_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """uint8 [H, W, C] -> the same with `axis` (0 or 1) resized to out_size."""
    index, weights, precision = axis_weights(image.shape[axis], out_size)
    x = np.ascontiguousarray(np.moveaxis(image, axis, 0)).reshape(image.shape[axis], -1)  # [in, other * C] uint8
    weights = weights.astype(np.int32)  # |w| < 2^15 and 2^15 * 255 * taps fits int32, as in ATen's loops
    acc = np.full((out_size, x.shape[1]), 1 << (precision - 1) if precision else 0, np.int32)
    term = np.empty_like(acc)
    for k in range(index.shape[1]):  # zero weights past each output's count
        np.multiply(x[index[:, k]], weights[:, k, None], out=term)  # [out, other * C]
        acc += term
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8).reshape(out_size, *np.moveaxis(image, axis, 0).shape[1:])
    return np.moveaxis(out, 0, axis)


def resize_lanczos(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C]: the width pass, then the height pass (a same-size axis is
    left as it is, as torch leaves it)."""
    if image.shape[1] != width:
        image = _resize_axis(image, width, 1)
    if image.shape[0] != height:
        image = _resize_axis(image, height, 0)
    return np.ascontiguousarray(image)
