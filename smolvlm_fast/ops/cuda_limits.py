"""Which calls each CUDA kernel of csrc/cuda/ takes: per op a `covers(*args, **kwargs)` predicate (dtypes, shapes,
layouts), in COVERS; the registry (ops/registry.py) gives a call to the kernel only where it says yes, and
ops/cuda.py's public functions refuse the rest (the kernels trust the sizes they are given).

Each predicate takes its launcher's arguments (the reference's, plus `out=` and tuning keywords) and leaves devices
to the launcher; its docstring's first paragraph says in words what it covers (`python -m smolvlm_fast.env` prints
it), ending with where the rest goes ("next": the next implementation in ops/registry.py's order).
Importing this module needs torch.
"""
from __future__ import annotations

import torch

try:
    from .. import _C
except ImportError:  # not built (no nvcc at install time, or SMOLVLM_FAST_BUILD_CUDA=0): nothing is covered
    _C = None

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cuda/common.cuh: DType
MAX_SPLIT_SIZE = 512   # keys per context split at most (the kernel keeps a split's scores in shared memory)


def aligned(t: torch.Tensor, elements: int = 1) -> bool:
    """16-byte aligned start, and every stride but the last a multiple of `elements`, last stride 1."""
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(s % elements == 0 for s in t.stride()[:-1]))


def _covers_int4_gemm(x, w, bias=None, *, out=None, split_k=None) -> bool:
    """fp16 / bf16 x with 1..16 rows (decode), K a multiple of 32, groups of 32 / 64 / 128, 16-byte aligned nibble
    rows (fp32 x, and M > 16 as in prefill: next)"""
    N, K = w.N, w.K
    q, s, m = w.qweight, w.scales, w.mins
    return (x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16) and 1 <= x.shape[0] <= _C.int4_gemm_max_m
            and x.shape[1] == K and K % 32 == 0 and w.group_size in (32, 64, 128) and K % w.group_size == 0
            and q.dtype == torch.uint8 and tuple(q.shape) == (N, K // 2) and aligned(q, 16)
            and s.dtype == torch.float16 and tuple(s.shape) == (N, K // w.group_size) and s.stride(-1) == 1
            and (m is None) == bool(w.symmetric)
            and (m is None or (m.dtype == torch.float16 and m.shape == s.shape and m.stride() == s.stride()))
            and (bias is None or (tuple(bias.shape) == (N,) and bias.dtype in DTYPES))
            and (out is None or (tuple(out.shape) == (x.shape[0], N) and out.dtype == x.dtype and out.stride(-1) == 1)))


def _covers_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, query_start_loc=None, cos_sin=None,
                            positions=None, rotary_dim=None, scale=None, out=None, max_seq_len=None,
                            split_size=None) -> bool:
    """one query per sequence (decode, with or without query_start_loc), head_dim 64 / 80 / 96 / 128, q and caches
    in one float dtype, 16-byte aligned cache rows (prefill batches: next)"""
    T, Hq, Dh = q.shape if q.dim() == 3 else (-1, 0, 0)
    num_seqs = seq_lens.shape[0]
    Hkv = k_cache.shape[2] if k_cache.dim() == 4 else 0
    return (q.dim() == 3 and k_cache.dim() == 4 and v_cache.shape == k_cache.shape and k_cache.shape[3] == Dh
            and Hkv > 0 and Hq % Hkv == 0 and q.dtype in DTYPES and q.dtype == k_cache.dtype == v_cache.dtype
            and _C.decode_attention_head_dim_supported(Dh) and T == num_seqs and block_tables.dim() == 2
            and block_tables.shape[0] == num_seqs
            and aligned(k_cache, 16 // q.element_size()) and aligned(v_cache, 16 // q.element_size())
            and (out is None or (out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1))
            and (split_size is None or 1 <= split_size <= MAX_SPLIT_SIZE))


def _covers_cross_attention(q, k, v, *, kv_lens=None, scale=None, out=None, split_size=None) -> bool:
    """up to 16 text queries per batch row, head_dim 64 / 80 / 96 / 128, q, k, v in one float dtype, 16-byte aligned
    k and v rows"""
    return (q.dim() == 4 and k.dim() == 4 and v.shape == k.shape and q.shape[0] == k.shape[0]
            and q.shape[3] == k.shape[3] and k.shape[2] > 0 and q.shape[2] % k.shape[2] == 0
            and q.dtype in DTYPES and q.dtype == k.dtype == v.dtype and q.shape[1] <= 16
            and _C.decode_attention_head_dim_supported(q.shape[3])
            and aligned(k, 16 // q.element_size()) and aligned(v, 16 // q.element_size())
            and (out is None or (out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()))
            and (split_size is None or 1 <= split_size <= MAX_SPLIT_SIZE))


def _covers_write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, cos_sin=None, positions=None,
                           rotary_dim=None) -> bool:
    """every call with k, v and the caches in one float dtype, the caches' head_dim contiguous"""
    return (k.dim() == 3 and v.shape == k.shape and k_cache.dim() == 4 and v_cache.shape == k_cache.shape
            and k_cache.shape[2:] == k.shape[1:] and k.dtype in DTYPES
            and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
            and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1)


def _covers_patch_embed(pixels, weight, bias, pos_embed, position_ids, *, groups=1, out=None) -> bool:
    """groups = 1, fp16 / bf16 pixels and weight (grouped convs, fp32: next)"""
    return (groups == 1 and pixels.dim() == 4 and weight.dim() == 4 and weight.shape[2] == weight.shape[3]
            and weight.shape[1] == pixels.shape[1] and pixels.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == pixels.dtype
            and (bias is None or (bias.dtype in DTYPES and tuple(bias.shape) == (weight.shape[0],))))


def _covers_dwsep_patch_embed(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids, *,
                              out=None) -> bool:
    """up to 512 channels, pixels and weights in one float dtype (more channels: next)"""
    return (pixels.dim() == 4 and dw_weight.dim() == 4 and dw_weight.shape[1] == 1
            and dw_weight.shape[2] == dw_weight.shape[3] and dw_weight.shape[0] == pixels.shape[1]
            and pw_weight.dim() == 2 and pw_weight.shape[1] == pixels.shape[1]
            and pixels.shape[1] <= _C.dwsep_max_channels and pixels.dtype in DTYPES
            and dw_weight.dtype == pw_weight.dtype == pixels.dtype
            and (dw_bias is None or tuple(dw_bias.shape) == (pixels.shape[1],))
            and (pw_bias is None or tuple(pw_bias.shape) == (pw_weight.shape[0],))
            and all(b is None or b.dtype in DTYPES for b in (dw_bias, pw_bias)))


COVERS = {"int4_gemm": _covers_int4_gemm, "paged_attention": _covers_paged_attention,
          "write_kv_cache": _covers_write_kv_cache, "cross_attention": _covers_cross_attention,
          "patch_embed": _covers_patch_embed, "dwsep_patch_embed": _covers_dwsep_patch_embed}
