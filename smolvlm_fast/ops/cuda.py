"""The CUDA kernels of csrc/cuda/ (the extension smolvlm_fast._C) behind the op contracts of shared/KERNELS.md.

Each function takes the reference's arguments (plus the Triton kernel's `out=` and tuning keywords), checks devices,
dtypes and layouts, and calls _C with raw device addresses, sizes, strides in elements, dtype codes and the current
CUDA stream. The kernels cover the decode-time calls they were written for; a call outside that goes to the next
implementation, the Triton kernel (else the reference), so `ops.<op>(..., impl="cuda")` always gives the contract's
result:

    int4_gemm          x fp16 / bf16 with 1..16 rows               (fp32 x, and M > 16 as in prefill: next)
    paged_attention    one query per sequence (decode), head_dim 64 / 80 / 96 / 128   (prefill batches: next)
    write_kv_cache     every call
    cross_attention    up to 16 text queries per batch row, head_dim 64 / 80 / 96 / 128
    patch_embed        groups = 1, fp16 / bf16 pixels              (grouped convs, fp32: next)
    dwsep_patch_embed  up to 512 channels

Importing this module needs torch; `available()` says whether _C is built.
"""
from __future__ import annotations

import functools

import torch

try:
    from .. import _C
except ImportError:  # not built (no nvcc at install time, or SMOLVLM_FAST_BUILD_CUDA=0)
    _C = None

OPS = ("int4_gemm", "paged_attention", "write_kv_cache", "cross_attention", "patch_embed", "dwsep_patch_embed")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cuda/common.cuh: DType
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_SPLIT_SIZE = 512   # keys per context split at most (the kernel keeps a split's scores in shared memory)
MIN_SPLIT_SIZE = 128   # below this a split's fixed cost (q load, partial write) outweighs its keys
BLOCKS_PER_SPLIT = 4   # int4_gemm: 32-element blocks of K per split at least (one step of a warp)
PROGRAMS_PER_SM = 2    # thread blocks per SM the split choices aim for


def available() -> bool:
    return _C is not None


def _next(name: str):
    """The implementation a call goes to when the CUDA kernel does not cover it: Triton, else the reference."""
    from . import _impls

    impls = _impls()[name]
    return impls.get("triton", impls["reference"])


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _device(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


@functools.cache
def _num_sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _require_cuda(op: str, *tensors) -> None:
    if _C is None:
        raise RuntimeError(f"ops.{op}: smolvlm_fast._C is not built "
                           "(see the README: Building from source on a CUDA machine)")
    devices = {t.device for t in tensors if t is not None}
    if any(d.type != "cuda" for d in devices) or len(devices) > 1:
        raise ValueError(f"ops.{op}: the CUDA kernel needs all tensors on one CUDA device, "
                         f"got {sorted(map(str, devices))}")


def _aligned(t: torch.Tensor, elements: int = 1) -> bool:
    """16-byte aligned start, and every stride but the last a multiple of `elements`, last stride 1."""
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(s % elements == 0 for s in t.stride()[:-1]))


def _index(t: torch.Tensor) -> torch.Tensor:
    """An int32 / int64 index tensor, contiguous (int64 stays int64: the kernels read both)."""
    if t.dtype not in INDEX_DTYPES:
        t = t.to(torch.int32)
    return t.contiguous()


def _is64(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype == torch.int64


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous() if t.dtype != torch.int32 else t.contiguous()


def choose_split_size(max_len: int, programs: int, device: int) -> int:
    """Keys per context split: enough splits that programs x splits fills the GPU (PROGRAMS_PER_SM per SM), each of
    MIN..MAX_SPLIT_SIZE keys, a multiple of 64; up to MIN_SPLIT_SIZE keys get one split (no combine kernel)."""
    wanted = -(-PROGRAMS_PER_SM * _num_sms(device) // programs)
    size = -(-max(1, -(-max_len // wanted)) // 64) * 64
    return max(MIN_SPLIT_SIZE, min(size, MAX_SPLIT_SIZE))


def _head_slices(group: int) -> int:
    return -(-group // 8)  # csrc/cuda/decode_attention.cuh: kMaxGroup query heads per thread block


def _partials(tokens: int, heads: int, splits: int, head_dim: int, device) -> tuple:
    if splits == 1:
        return 0, 0, 0, ()
    acc = torch.empty(tokens, heads, splits, head_dim, dtype=torch.float32, device=device)
    stats = torch.empty(2, tokens, heads, splits, dtype=torch.float32, device=device)
    return acc.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(), (acc, stats)


# ---------------------------------------------------------------- int4_gemm

def choose_split_k(n: int, k: int, device: int) -> int:
    """Splits of K so that the 64-row thread blocks x splits fill the GPU, each BLOCKS_PER_SPLIT blocks or more."""
    blocks = -(-n // 64)
    return max(1, min(k // 32 // BLOCKS_PER_SPLIT, PROGRAMS_PER_SM * _num_sms(device) // blocks))


def _int4_covered(x, w, bias, out) -> bool:
    N, K = w.N, w.K
    q, s, m = w.qweight, w.scales, w.mins
    return (x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16) and 1 <= x.shape[0] <= _C.int4_gemm_max_m
            and x.shape[1] == K and K % 32 == 0 and w.group_size in (32, 64, 128) and K % w.group_size == 0
            and q.dtype == torch.uint8 and tuple(q.shape) == (N, K // 2) and _aligned(q, 16)
            and s.dtype == torch.float16 and tuple(s.shape) == (N, K // w.group_size) and s.stride(-1) == 1
            and (m is None) == bool(w.symmetric)
            and (m is None or (m.dtype == torch.float16 and m.shape == s.shape and m.stride() == s.stride()))
            and (bias is None or (tuple(bias.shape) == (N,) and bias.dtype in DTYPES))
            and (out is None or (tuple(out.shape) == (x.shape[0], N) and out.dtype == x.dtype and out.stride(-1) == 1)))


def int4_gemm(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
              split_k: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequantize(w).T (+ bias), fp32 accumulation, y in x's dtype (w: int4_linear.Int4Tensors).
    split_k forces the number of K splits (tests use it)."""
    _require_cuda("int4_gemm", x, w.qweight, w.scales, w.mins, bias, out)
    if not _int4_covered(x, w, bias, out):
        fn = _next("int4_gemm")
        if out is None:
            return fn(x, w, bias)
        out.copy_(fn(x, w, bias))
        return out
    M, K = x.shape
    if not _aligned(x, 8):
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh allocation: 16-byte aligned rows
    if bias is not None:
        bias = bias.contiguous()
    if out is None:
        out = torch.empty(M, w.N, dtype=x.dtype, device=x.device)
    device = _device(x)
    splits = split_k or choose_split_k(w.N, K, device)
    blocks = K // 32
    splits = -(-blocks // -(-blocks // max(1, min(splits, blocks))))  # no empty split
    workspace = torch.empty(splits, M, w.N, dtype=torch.float32, device=x.device) if splits > 1 else None
    _C.int4_gemm(out.data_ptr(), x.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(), _ptr(w.mins), _ptr(bias),
                 _ptr(workspace), M, w.N, K, w.group_size, out.stride(0), x.stride(0), w.qweight.stride(0),
                 w.scales.stride(0), DTYPES[x.dtype], DTYPES[bias.dtype] if bias is not None else 0, splits, device,
                 _stream(x))
    return out


# ---------------------------------------------------------------- attention

def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, query_start_loc=None, cos_sin=None,
                    positions=None, rotary_dim=None, scale=None, out=None, max_seq_len=None, split_size=None):
    """Packed queries q [T, Hq, Dh] over the paged cache -> [T, Hq, Dh] (KERNELS.md). The CUDA kernel runs one query
    per sequence (T == num_seqs, with or without query_start_loc); other calls go to the next implementation.

    max_seq_len: an upper bound of seq_lens (default: the block tables' width x block_size, so no host sync);
    split_size: keys per context split (default: choose_split_size)."""
    _require_cuda("paged_attention", q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, cos_sin, positions,
                  out)
    T, Hq, Dh = q.shape if q.dim() == 3 else (-1, 0, 0)
    num_seqs = seq_lens.shape[0]
    Hkv = k_cache.shape[2] if k_cache.dim() == 4 else 0
    covered = (q.dim() == 3 and k_cache.dim() == 4 and v_cache.shape == k_cache.shape and k_cache.shape[3] == Dh
               and Hkv > 0 and Hq % Hkv == 0 and q.dtype in DTYPES and q.dtype == k_cache.dtype == v_cache.dtype
               and _C.decode_attention_head_dim_supported(Dh) and T == num_seqs and block_tables.dim() == 2
               and block_tables.shape[0] == num_seqs
               and _aligned(k_cache, 16 // q.element_size()) and _aligned(v_cache, 16 // q.element_size())
               and (out is None or (out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1))
               and (split_size is None or 1 <= split_size <= MAX_SPLIT_SIZE))
    kwargs = dict(query_start_loc=query_start_loc, cos_sin=cos_sin, positions=positions, rotary_dim=rotary_dim,
                  scale=scale)
    if not covered:
        result = _next("paged_attention")(q, k_cache, v_cache, block_tables, seq_lens, **kwargs)
        return result if out is None else out.copy_(result)
    if cos_sin is not None:
        rotary_dim = rotary_dim or cos_sin.shape[-1]
        if positions is None or tuple(positions.shape) != (T,) or cos_sin.dtype not in DTYPES:
            raise ValueError(f"paged_attention: cos_sin needs positions [{T}] and a float table")
        if rotary_dim % 2 or not 0 < rotary_dim <= min(Dh, cos_sin.shape[-1]):
            raise ValueError(f"paged_attention: rotary_dim {rotary_dim} must be even and <= head_dim {Dh} and <= the "
                             f"table's {cos_sin.shape[-1]} columns")
        cos_sin = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
        positions = _index(positions)
    if query_start_loc is not None and tuple(query_start_loc.shape) != (num_seqs + 1,):
        raise ValueError(f"paged_attention: query_start_loc must be [{num_seqs + 1}]")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    if T == 0:
        return out
    block_size = k_cache.shape[1]
    block_tables, seq_lens = _i32(block_tables), _i32(seq_lens)
    query_start_loc = None if query_start_loc is None else _i32(query_start_loc)
    device = _device(q)
    slices = _head_slices(Hq // Hkv)
    max_len = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    split = split_size or choose_split_size(max_len, T * Hkv * slices, device)
    splits = max(1, -(-max_len // split))
    acc, mx, sm, keep = _partials(T, Hq, splits, Dh, q.device)
    (kb, ks, kh), (vb, vs, vh) = k_cache.stride()[:3], v_cache.stride()[:3]
    _C.paged_attention(_C.PagedAttentionArgs(
        out=out.data_ptr(), q=q.data_ptr(), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
        block_tables=block_tables.data_ptr(), seq_lens=seq_lens.data_ptr(), query_start_loc=_ptr(query_start_loc),
        cos_sin=_ptr(cos_sin), positions=_ptr(positions), partial_acc=acc, partial_max=mx, partial_sum=sm,
        num_tokens=T, num_seqs=num_seqs, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=Dh, block_size=block_size,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_kb=kb, stride_ks=ks, stride_kh=kh, stride_vb=vb, stride_vs=vs, stride_vh=vh,
        stride_bt=block_tables.stride(0), stride_cs=cos_sin.stride(0) if cos_sin is not None else 0,
        rotary_dim=rotary_dim or 0, cos_sin_dtype=DTYPES[cos_sin.dtype] if cos_sin is not None else 0,
        positions_int64=_is64(positions), scale=Dh**-0.5 if scale is None else float(scale), split_size=split,
        num_splits=splits, dtype=DTYPES[q.dtype], device=device, stream=_stream(q)))
    return out


def cross_attention(q, k, v, *, kv_lens=None, scale=None, out=None, split_size=None):
    """Text queries q [B, S, Hq, Dh] over image keys/values k, v [B, T, Hkv, Dh] -> [B, S, Hq, Dh], not causal;
    kv_lens [B] masks padded image tokens. The CUDA kernel runs up to 16 queries per batch row (decode: S = 1)."""
    _require_cuda("cross_attention", q, k, v, out)
    covered = (q.dim() == 4 and k.dim() == 4 and v.shape == k.shape and q.shape[0] == k.shape[0]
               and q.shape[3] == k.shape[3] and k.shape[2] > 0 and q.shape[2] % k.shape[2] == 0
               and q.dtype in DTYPES and q.dtype == k.dtype == v.dtype and q.shape[1] <= 16
               and _C.decode_attention_head_dim_supported(q.shape[3])
               and _aligned(k, 16 // q.element_size()) and _aligned(v, 16 // q.element_size())
               and (out is None or (out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()))
               and (split_size is None or 1 <= split_size <= MAX_SPLIT_SIZE))
    if not covered:
        result = _next("cross_attention")(q, k, v, kv_lens=kv_lens, scale=scale)
        return result if out is None else out.copy_(result)
    B, S, Hq, Dh = q.shape
    T, Hkv = k.shape[1], k.shape[2]
    if kv_lens is not None:
        kv_lens = torch.as_tensor(kv_lens, device=q.device)
        if tuple(kv_lens.shape) != (B,) or kv_lens.dtype not in INDEX_DTYPES:
            raise ValueError(f"cross_attention: kv_lens must be int32/int64 of shape {(B,)}; got {kv_lens.dtype} "
                             f"{tuple(kv_lens.shape)}")
        kv_lens = kv_lens.contiguous()
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    if B * S * Hq == 0:
        return out
    if T == 0:  # no image tokens: no update (the reference's zeros)
        return out.zero_()
    device = _device(q)
    split = split_size or choose_split_size(max(T, 1), B * S * Hkv * _head_slices(Hq // Hkv), device)
    splits = max(1, -(-T // split))
    acc, mx, sm, keep = _partials(B * S, Hq, splits, Dh, q.device)
    (kb, kt, kh), (vb, vt, vh) = k.stride()[:3], v.stride()[:3]
    _C.cross_attention(_C.CrossAttentionArgs(
        out=out.data_ptr(), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), kv_lens=_ptr(kv_lens), partial_acc=acc,
        partial_max=mx, partial_sum=sm, batch=B, queries_per_batch=S, kv_tokens=T, num_q_heads=Hq, num_kv_heads=Hkv,
        head_dim=Dh, stride_qt=Hq * Dh, stride_qh=Dh, stride_ot=Hq * Dh, stride_oh=Dh,
        stride_kb=kb, stride_kt=kt, stride_kh=kh, stride_vb=vb, stride_vt=vt, stride_vh=vh,
        kv_lens_int64=_is64(kv_lens), scale=Dh**-0.5 if scale is None else float(scale), split_size=split,
        num_splits=splits, dtype=DTYPES[q.dtype], device=device, stream=_stream(q)))
    return out


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, cos_sin=None, positions=None, rotary_dim=None) -> None:
    """k_cache/v_cache[slot // block_size, slot % block_size] = rope(k), v for each token whose slot is not -1.
    In place (slots past the cache are skipped, not written)."""
    _require_cuda("write_kv_cache", k, v, k_cache, v_cache, slot_mapping, cos_sin, positions)
    covered = (k.dim() == 3 and v.shape == k.shape and k_cache.dim() == 4 and v_cache.shape == k_cache.shape
               and k_cache.shape[2:] == k.shape[1:] and k.dtype in DTYPES
               and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
               and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1)
    if not covered:
        return _next("write_kv_cache")(k, v, k_cache, v_cache, slot_mapping, cos_sin=cos_sin, positions=positions,
                                       rotary_dim=rotary_dim)
    T, H, Dh = k.shape
    if tuple(slot_mapping.shape) != (T,) or slot_mapping.dtype not in INDEX_DTYPES:
        raise ValueError(f"write_kv_cache: slot_mapping must be int [T={T}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if cos_sin is not None:
        rotary_dim = rotary_dim or cos_sin.shape[-1]
        if rotary_dim % 2 or not 0 < rotary_dim <= min(Dh, cos_sin.shape[-1]) or cos_sin.dtype not in DTYPES:
            raise ValueError(f"write_kv_cache: rotary_dim {rotary_dim} must be even and at most head_dim {Dh} and the "
                             f"table width {cos_sin.shape[-1]}")
        if positions is None or tuple(positions.shape) != (T,):
            raise ValueError("write_kv_cache: cos_sin needs positions [T]")
        cos_sin = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
        positions = _index(positions)
    if T == 0:
        return None
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    slot_mapping = _index(slot_mapping)
    (kcb, kcs, kch), (vcb, vcs, vch) = k_cache.stride()[:3], v_cache.stride()[:3]
    _C.write_kv_cache(_C.WriteKvCacheArgs(
        k=k.data_ptr(), v=v.data_ptr(), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
        slot_mapping=slot_mapping.data_ptr(), cos_sin=_ptr(cos_sin), positions=_ptr(positions), num_tokens=T,
        num_heads=H, head_dim=Dh, block_size=k_cache.shape[1], num_blocks=k_cache.shape[0],
        stride_kt=k.stride(0), stride_kh=k.stride(1), stride_vt=v.stride(0), stride_vh=v.stride(1),
        stride_kcb=kcb, stride_kcs=kcs, stride_kch=kch, stride_vcb=vcb, stride_vcs=vcs, stride_vch=vch,
        stride_cs=cos_sin.stride(0) if cos_sin is not None else 0, rotary_dim=rotary_dim or 0,
        slots_int64=_is64(slot_mapping), positions_int64=_is64(positions),
        cos_sin_dtype=DTYPES[cos_sin.dtype] if cos_sin is not None else 0, dtype=DTYPES[k.dtype], device=_device(k),
        stream=_stream(k)))
    return None


# ---------------------------------------------------------------- vision

def _positions(op, pos_embed, position_ids, B, N, D, device):
    """(pos_embed, position_ids [B, N] or None, their strides) checked as the Triton kernel checks them."""
    if pos_embed is None:
        return None, None, 0, 0, 0
    if pos_embed.dim() != 2 or pos_embed.shape[1] != D or pos_embed.dtype not in DTYPES:
        raise ValueError(f"{op}: pos_embed must be a float [num_positions, {D}] tensor; got {pos_embed.dtype} "
                         f"{tuple(pos_embed.shape)}")
    pos_embed = pos_embed if pos_embed.stride(-1) == 1 else pos_embed.contiguous()
    if position_ids is None:
        if pos_embed.shape[0] < N:
            raise ValueError(f"{op}: {N} patches but pos_embed has only {pos_embed.shape[0]} positions")
        return pos_embed, None, pos_embed.stride(0), 0, 0
    position_ids = torch.as_tensor(position_ids, device=device)
    if position_ids.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: position_ids must be int32 or int64; got {position_ids.dtype}")
    try:
        position_ids = position_ids.expand(B, N)  # [N] or [1, N] broadcast over the batch, as in torch
    except RuntimeError:
        raise ValueError(f"{op}: position_ids {tuple(position_ids.shape)} do not fit [B, N] = [{B}, {N}]") from None
    return pos_embed, position_ids, pos_embed.stride(0), *position_ids.stride()


def _output(op, out, pixels, pos_embed, B, N, D):
    dtype = pixels.dtype if pos_embed is None else torch.promote_types(pixels.dtype, pos_embed.dtype)
    if out is None:
        return torch.empty(B, N, D, dtype=dtype, device=pixels.device)
    if tuple(out.shape) != (B, N, D) or out.dtype != dtype or not out.is_contiguous() or out.device != pixels.device:
        raise ValueError(f"{op}: out must be a contiguous [{B}, {N}, {D}] {dtype} tensor on {pixels.device}")
    return out


def _image_args(out, pixels, pos_embed, position_ids, B, C, rows, cols, P, D, stride_pos, stride_ib, stride_in):
    """The _C.PatchImageArgs fields patch_embed and dwsep_patch_embed share (all but the biases' dtype), as a dict."""
    pb, pc, ph, pw = pixels.stride()
    return dict(out=out.data_ptr(), pixels=pixels.data_ptr(), pos_embed=_ptr(pos_embed),
                position_ids=_ptr(position_ids), batch=B, channels=C, patches_h=rows, patches_w=cols, patch=P, dim=D,
                stride_pb=pb, stride_pc=pc, stride_ph=ph, stride_pw=pw, stride_pos=stride_pos, stride_ib=stride_ib,
                stride_in=stride_in, ids_int64=_is64(position_ids), dtype=DTYPES[pixels.dtype],
                pos_dtype=DTYPES[pos_embed.dtype] if pos_embed is not None else 0, out_dtype=DTYPES[out.dtype],
                device=_device(pixels), stream=_stream(pixels))


def _bias_dtype(*biases) -> int:
    given = [b for b in biases if b is not None]
    return DTYPES[given[0].dtype] if given else 0


def patch_embed(pixels, weight, bias, pos_embed, position_ids, *, groups=1, out=None):
    """conv2d(pixels, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos_embed[position_ids] -> [B, N, D]:
    the CUDA kernel for groups = 1 and fp16 / bf16 pixels; other calls go to the next implementation."""
    _require_cuda("patch_embed", pixels, weight, bias, pos_embed, out)
    covered = (groups == 1 and pixels.dim() == 4 and weight.dim() == 4 and weight.shape[2] == weight.shape[3]
               and weight.shape[1] == pixels.shape[1] and pixels.dtype in (torch.float16, torch.bfloat16)
               and weight.dtype == pixels.dtype and (bias is None or (bias.dtype in DTYPES
                                                                      and tuple(bias.shape) == (weight.shape[0],))))
    if not covered:
        result = _next("patch_embed")(pixels, weight, bias, pos_embed, position_ids, groups=groups)
        return result if out is None else out.copy_(result)
    D, C, P, _ = weight.shape
    B, _, H, W = pixels.shape
    rows, cols = H // P, W // P
    N = rows * cols
    pos_embed, position_ids, stride_pos, stride_ib, stride_in = _positions("patch_embed", pos_embed, position_ids, B,
                                                                           N, D, pixels.device)
    out = _output("patch_embed", out, pixels, pos_embed, B, N, D)
    if B * N * D == 0:
        return out
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    _C.patch_embed(_C.PatchEmbedArgs(weight=weight.data_ptr(), bias=_ptr(bias), bias_dtype=_bias_dtype(bias),
                                     **_image_args(out, pixels, pos_embed, position_ids, B, C, rows, cols, P, D,
                                                   stride_pos, stride_ib, stride_in)))
    return out


def dwsep_patch_embed(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids, *, out=None):
    """Depthwise P x P conv (stride P), pointwise projection pw_weight [D, C], + pw_bias + pos_embed[position_ids]
    -> [B, N, D] in one kernel (up to 512 channels; more go to the next implementation)."""
    _require_cuda("dwsep_patch_embed", pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, out)
    covered = (pixels.dim() == 4 and dw_weight.dim() == 4 and dw_weight.shape[1] == 1
               and dw_weight.shape[2] == dw_weight.shape[3] and dw_weight.shape[0] == pixels.shape[1]
               and pw_weight.dim() == 2 and pw_weight.shape[1] == pixels.shape[1]
               and pixels.shape[1] <= _C.dwsep_max_channels and pixels.dtype in DTYPES
               and dw_weight.dtype == pw_weight.dtype == pixels.dtype
               and (dw_bias is None or tuple(dw_bias.shape) == (pixels.shape[1],))
               and (pw_bias is None or tuple(pw_bias.shape) == (pw_weight.shape[0],))
               and all(b is None or b.dtype in DTYPES for b in (dw_bias, pw_bias)))
    if not covered:
        result = _next("dwsep_patch_embed")(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids)
        return result if out is None else out.copy_(result)
    C, _, P, _ = dw_weight.shape
    D = pw_weight.shape[0]
    B, _, H, W = pixels.shape
    rows, cols = H // P, W // P
    N = rows * cols
    pos_embed, position_ids, stride_pos, stride_ib, stride_in = _positions("dwsep_patch_embed", pos_embed,
                                                                           position_ids, B, N, D, pixels.device)
    out = _output("dwsep_patch_embed", out, pixels, pos_embed, B, N, D)
    if B * N * D == 0:
        return out
    if dw_bias is not None and pw_bias is not None and dw_bias.dtype != pw_bias.dtype:
        dw_bias, pw_bias = dw_bias.float(), pw_bias.float()  # the kernel reads both biases with one dtype
    dw_weight, pw_weight = dw_weight.contiguous(), pw_weight.contiguous()
    dw_bias = None if dw_bias is None else dw_bias.contiguous()
    pw_bias = None if pw_bias is None else pw_bias.contiguous()
    _C.dwsep_patch_embed(_C.DwsepPatchEmbedArgs(
        dw_weight=dw_weight.data_ptr(), dw_bias=_ptr(dw_bias), pw_weight=pw_weight.data_ptr(), pw_bias=_ptr(pw_bias),
        bias_dtype=_bias_dtype(dw_bias, pw_bias),
        **_image_args(out, pixels, pos_embed, position_ids, B, C, rows, cols, P, D, stride_pos, stride_ib, stride_in)))
    return out
