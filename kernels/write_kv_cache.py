"""Write new keys and values into the paged KV cache, rotating the keys with RoPE on the way.

Layout: k, v `[T, Hkv, Dh]` (token and head strides free, unit stride along Dh: a slice of a fused qkv
output works); k_cache, v_cache `[num_blocks, block_size, Hkv, Dh]` (unit stride along Dh);
slot_mapping `[T]` with slot = block * block_size + offset; a slot outside [0, num_blocks * block_size) skips
the token (-1 is the padding value; a slot past the cache is never written out of bounds); positions `[T]`;
cos_sin `[max_position, >= rotary_dim]`, columns [0, R/2) cos and [R/2, R) sin (R = rotary_dim).
Grid (T, cdiv(Hkv, BLOCK_H)): one program per token and block of heads, a [BLOCK_H, BLOCK_D] tile.

RoPE is rotate-half on the first R features of each head (R < Dh is Phi-style partial rotary):
  d < R/2:       k'[d] = k[d] * cos[d] - k[d + R/2] * sin[d]
  R/2 <= d < R:  k'[d] = k[d] * cos[d - R/2] + k[d - R/2] * sin[d - R/2]
  d >= R:        k'[d] = k[d]
cos and sin are rounded to k's dtype first (as the reference does); the rotation is done in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILE = 4096  # elements of one program's [BLOCK_H, BLOCK_D] tile


@triton.jit
def _write_kv_cache_kernel(
    k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, slot_mapping_ptr, cos_sin_ptr, positions_ptr,
    num_heads, head_dim, block_size, num_slots, rotary_half,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_cs_pos,
    HAS_ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):  # padding, or past the cache: skipped, as in the reference
        return
    block = slot // block_size
    offset = slot % block_size

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (dims < head_dim)[None, :]  # [BLOCK_H, BLOCK_D]

    k_row_ptr = k_ptr + token * stride_k_tok + heads[:, None] * stride_k_head  # [BLOCK_H, 1]
    k = tl.load(k_row_ptr + dims[None, :], mask=mask, other=0.0)
    if HAS_ROPE:
        pos = tl.load(positions_ptr + token).to(tl.int64)
        rotates = dims < 2 * rotary_half  # [BLOCK_D]
        first = dims < rotary_half
        freq = tl.where(first, dims, dims - rotary_half)
        partner = tl.where(first, dims + rotary_half, dims - rotary_half)
        table_ptr = cos_sin_ptr + pos * stride_cs_pos + freq
        cos = tl.load(table_ptr, mask=rotates, other=1.0).to(k_ptr.dtype.element_ty).to(tl.float32)
        sin = tl.load(table_ptr + rotary_half, mask=rotates, other=0.0).to(k_ptr.dtype.element_ty).to(tl.float32)
        sin = tl.where(first, -sin, sin)
        k_partner = tl.load(k_row_ptr + partner[None, :], mask=mask & rotates[None, :], other=0.0)
        k_rot = k.to(tl.float32) * cos[None, :] + k_partner.to(tl.float32) * sin[None, :]
        k = tl.where(rotates[None, :], k_rot.to(k_ptr.dtype.element_ty), k)
    k_cache_offs = block * stride_kc_block + offset * stride_kc_slot + heads[:, None] * stride_kc_head + dims[None, :]
    tl.store(k_cache_ptr + k_cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)

    v = tl.load(v_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :], mask=mask, other=0.0)
    v_cache_offs = block * stride_vc_block + offset * stride_vc_slot + heads[:, None] * stride_vc_head + dims[None, :]
    tl.store(v_cache_ptr + v_cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(k, v, k_cache, v_cache, slot_mapping, cos_sin, positions, rotary_dim) -> int:
    """Shape checks; returns the rotary dim (0 without RoPE)."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"write_kv_cache: k and v must be [T, Hkv, Dh] of one shape, "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"write_kv_cache: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} are not "
                         f"[num_blocks, block_size, {k.shape[1]}, {k.shape[2]}]")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("write_kv_cache: the caches need unit stride along head_dim")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"write_kv_cache: slot_mapping must be int [T={k.shape[0]}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if cos_sin is None:
        return 0
    rotary_dim = rotary_dim or cos_sin.shape[-1]
    if rotary_dim % 2 or rotary_dim > k.shape[-1] or rotary_dim > cos_sin.shape[-1]:
        raise ValueError(f"write_kv_cache: rotary_dim {rotary_dim} must be even and at most head_dim "
                         f"{k.shape[-1]} and the table width {cos_sin.shape[-1]}")
    if positions is None or positions.shape != (k.shape[0],):
        raise ValueError("write_kv_cache: cos_sin needs positions [T]")
    return rotary_dim


def _write_kv_cache_fwd(k, v, k_cache, v_cache, slot_mapping, cos_sin, positions, rotary_dim):
    rotary_dim = _check(k, v, k_cache, v_cache, slot_mapping, cos_sin, positions, rotary_dim)
    k, v, slot_mapping = _unit_last(k), _unit_last(v), slot_mapping.contiguous()
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    has_rope = rotary_dim > 0
    if has_rope:
        cos_sin, positions = _unit_last(cos_sin), positions.contiguous()
    else:
        cos_sin, positions = k, slot_mapping  # placeholders, never read

    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, MAX_TILE // block_d))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _write_kv_cache_kernel[grid](
        k_cache, v_cache, k, v, slot_mapping, cos_sin, positions,
        num_heads, head_dim, k_cache.shape[1], k_cache.shape[0] * k_cache.shape[1], rotary_dim // 2,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        cos_sin.stride(0),
        HAS_ROPE=has_rope, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=max(1, min(8, block_h * block_d // 256)),
    )


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, cos_sin: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None, rotary_dim: int | None = None) -> None:
    """k_cache/v_cache[slot // block_size, slot % block_size] = rope(k), v for each token whose slot lies in
    [0, num_blocks * block_size); other slots (-1: padding) are skipped. In place; nothing is returned."""
    _write_kv_cache_fwd(k, v, k_cache, v_cache, slot_mapping, cos_sin, positions, rotary_dim)
