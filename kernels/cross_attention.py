"""Cross-attention forward: text queries over cached image keys/values, not causal, padded image tokens masked.

Layout (token-major, any strides):
    q  [B, S, Hq, Dh]  (S = 1 in decode)      k, v  [B, T, Hkv, Dh]      kv_lens [B]      out [B, S, Hq, Dh]

One program owns BLOCK_M rows of one KV head's query group, row r being (token r // G, query head kvh·G + r % G)
with G = Hq / Hkv: in decode (S = 1) the G heads sharing a K/V head are one 16-row tile, so each image K/V tile
is read once per group rather than once per query head (query head h reads KV head h // G). The key loop is
rope_attention's (`_attend_blocks`, its RoPE and causal switches off): full key blocks without masks, then the
block that ends at kv_len with the length mask. A batch row with kv_len = 0 sees no key and is written as zeros,
like the reference. Block sizes are autotuned as in rope_attention (16-row tiles when S·G <= 16). Decode runs
B·Hkv programs, each over all T image tokens (no split over T: T is at most ~1000 image tokens here).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope_attention import (LOG2E, _attend_blocks, _group_rows, _load_rows, _store_rows, block_d,
                             check_attention_inputs, configs, dot_options, prune_configs, size_class)


@triton.autotune(configs=configs(), key=["size_class", "BLOCK_D"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=["size_class"])
def _cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, kv_lens_ptr,
    S, T, N_KV_HEADS, qk_scale, size_class,  # size_class: the autotuning key only
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m, b, kv_head, token, head, row_valid = _group_rows(S, N_KV_HEADS, GROUP, BLOCK_M)

    kv_len = T
    if KV_LENS:
        kv_len = tl.minimum(tl.load(kv_lens_ptr + b).to(tl.int64), T)
    full_end = kv_len // BLOCK_N * BLOCK_N

    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, b * stride_qb + token * stride_qs + head * stride_qh, row_valid, offs_d, stride_qd,
                   token, q_ptr, 0, 0, HEAD_DIM=HEAD_DIM, ROTARY_DIM=0, ROPE=False, MASK_ROWS=True)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_head = k_ptr + b * stride_kb + kv_head * stride_kh
    v_head = v_ptr + b * stride_vb + kv_head * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, token, k_head, v_head, stride_kt, stride_kd, stride_vt,
                                   stride_vd, k_ptr, 0, k_ptr, 0, 0, k_ptr, 0, 0, full_end, kv_len, qk_scale,
                                   HEAD_DIM=HEAD_DIM, ROTARY_DIM=0, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, ROPE=False,
                                   CAUSAL=False, BOUNDS=False, KEY_MASK=False, DOT_PRECISION=DOT_PRECISION)
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, token, k_head, v_head, stride_kt, stride_kd, stride_vt,
                                   stride_vd, k_ptr, 0, k_ptr, 0, 0, k_ptr, 0, full_end, kv_len, kv_len, qk_scale,
                                   HEAD_DIM=HEAD_DIM, ROTARY_DIM=0, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, ROPE=False,
                                   CAUSAL=False, BOUNDS=True, KEY_MASK=False, DOT_PRECISION=DOT_PRECISION)
    _store_rows(out_ptr, b * stride_ob + token * stride_os + head * stride_oh, row_valid, acc, l_i, stride_od,
                HEAD_DIM, BLOCK_D)


def cross_attention(q, k, v, *, kv_lens=None, scale=None, out=None):
    """Text queries q [B, S, Hq, Dh] over image k, v [B, T, Hkv, Dh] -> [B, S, Hq, Dh], not causal.

    kv_lens [B]: image tokens at index >= kv_len are padding (kv_len 0 gives zeros). out: an optional
    [B, S, Hq, Dh] tensor to write into.
    """
    B, S, Hq, Hkv, Dh = check_attention_inputs(q, k, v, out)
    T = k.shape[1]
    scale = Dh**-0.5 if scale is None else float(scale)
    out = torch.empty_like(q) if out is None else out
    if B * S * Hq == 0:
        return out
    if kv_lens is not None:
        kv_lens = torch.as_tensor(kv_lens, device=q.device)
        if tuple(kv_lens.shape) != (B,) or kv_lens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kv_lens must be int32/int64 of shape {(B,)}; got {kv_lens.dtype} {tuple(kv_lens.shape)}")

    group = Hq // Hkv
    grid = lambda meta: (triton.cdiv(S * group, meta["BLOCK_M"]), B * Hkv)  # noqa: E731
    _cross_attention_kernel[grid](
        q, k, v, out, q if kv_lens is None else kv_lens,
        S, T, Hkv, scale * LOG2E, size_class(S * group, B * Hkv, q.device),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        GROUP=group, HEAD_DIM=Dh, BLOCK_D=block_d(Dh),
        KV_LENS=kv_lens is not None, **dot_options(q.dtype),
    )
    return out
