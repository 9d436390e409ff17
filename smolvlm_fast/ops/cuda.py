"""The launchers of the CUDA kernels of csrc/cuda/ (the extension smolvlm_fast._C), behind the op contracts of
smolvlm_fast/ops/README.md.

Each kernel covers the decode-time calls it was written for: ops/cuda_limits.py says which (COVERS), and the registry
(ops/registry.py) gives a call to the kernel only where its predicate says yes, else to the next implementation
(Triton, else the reference), so `ops.<op>(..., impl="cuda")` always gives the contract's result. The registry then
calls the op's launcher in LAUNCH: it checks devices, makes the layouts the kernel reads, and calls _C with raw device
addresses, sizes, strides in elements, dtype codes and the current CUDA stream. The module's public functions
(`cuda.int4_gemm`, ...) check the predicate themselves and refuse a call outside the kernel. They all take the
reference's arguments plus `out=` and tuning keywords.

Importing this module needs torch; `available()` says whether _C is built, `unusable(device)` whether it runs on
a GPU (the registry asks on a call's first use, and falls back with one warning where it does not).

SMOLVLM_FAST_CUDA_SYNC=1 (debugging): before each launch the index arguments (positions, slot_mapping, block_tables,
seq_lens, query_start_loc, position_ids, kv_lens) are bounds-checked on the host, since the kernels trust them, and
after it the device is synchronized, so that an error is raised by the launch that caused it, naming the op.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch

from .cuda_limits import _C, COVERS, DTYPES, MAX_SPLIT_SIZE
from .cuda_limits import aligned as _aligned

INDEX_DTYPES = (torch.int32, torch.int64)
MIN_SPLIT_SIZE = 128   # below this a split's fixed cost (q load, partial write) outweighs its keys
BLOCKS_PER_SPLIT = 4   # int4_gemm: 32-element blocks of K per split at least (one step of a warp)
PROGRAMS_PER_SM = 2    # thread blocks per SM the split choices aim for


SYNC_ENV = "SMOLVLM_FAST_CUDA_SYNC"


def available() -> bool:
    """_C is built (whether it runs on a given GPU: unusable())."""
    return _C is not None


@functools.cache
def unusable(device: int | None = None) -> str | None:
    """Why _C cannot run on this GPU, or None: a driver older than the CUDA runtime it was built with, or no kernel
    image for the GPU's architecture. Where it cannot tell, None (the first launch's error then speaks)."""
    if _C is None:
        return "smolvlm_fast._C is not built"
    runtime, driver = _C.cuda_runtime_version(), _C.cuda_driver_version()
    if 0 < driver and driver // 1000 < runtime // 1000:
        return (f"CUDA driver version is insufficient for CUDA runtime version: smolvlm_fast._C needs CUDA "
                f"{runtime // 1000}.x, the driver supports {driver // 1000}.{driver % 1000 // 10}")
    index = device if device is not None else torch.cuda.current_device()
    return arch_mismatch(_C.archs, _C.compute_capability(index))


def arch_mismatch(archs: str, capability: str) -> str | None:
    """Why a module built for `archs` ("sm_80;sm_90", the last with PTX: setup.py) has no kernel image for a GPU of
    compute capability `capability` ("8.6"), or None where it has one (or either is in a form not known here)."""
    built = [a.strip().removeprefix("sm_") for a in archs.split(";") if a.strip()]
    parts = capability.split(".")
    if not built or not all(b.isdigit() for b in built) or len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    major, minor = int(parts[0]), int(parts[1])
    numbers = sorted(int(b) for b in built)
    # SASS runs on its major version at the same or a higher minor one; the highest one's PTX on any newer GPU
    if any(n // 10 == major and n % 10 <= minor for n in numbers) or numbers[-1] <= major * 10 + minor:
        return None
    return (f"no kernel image is available for execution on the device: smolvlm_fast._C was built for {archs}, the "
            f"GPU has compute capability {capability} (rebuild with SMOLVLM_FAST_CUDA_ARCH={capability})")


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


def _int4_gemm(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
               split_k: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequantize(w).T (+ bias), fp32 accumulation, y in x's dtype (w: Int4Tensors of
    models/int4_linear.py). split_k forces the number of K splits (tests use it)."""
    _require_cuda("int4_gemm", x, w.qweight, w.scales, w.mins, bias, out)
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

def _paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, query_start_loc=None, cos_sin=None,
                     positions=None, rotary_dim=None, scale=None, out=None, max_seq_len=None, split_size=None):
    """Packed queries q [T, Hq, Dh] over the paged cache -> [T, Hq, Dh] (ops/README.md), one query per sequence.

    max_seq_len: an upper bound of seq_lens that sizes the context splits: ceil(max_seq_len / split_size) of them,
    the last reading on to each sequence's end, so a bound below a length costs speed, not keys (it is not checked
    against device seq_lens, which would cost the host sync it saves: pass max(seq_lens) from the host lists the
    tensors were made of). Default: the block tables'
    capacity, width x block_size, the only bound known without a sync (tight for the engine's tables, which are as
    wide as the step's longest sequence; loose for tables padded to a fixed width, as under CUDA graphs: there it
    gives many empty splits and a split size chosen for a long context, so pass max_seq_len).
    split_size: keys per context split (default: choose_split_size)."""
    if max_seq_len is not None:  # checked first: it needs no device
        index = getattr(max_seq_len, "__index__", None)  # ints, NumPy ints
        if index is None or index() < 0:
            raise ValueError(f"paged_attention: max_seq_len must be an int >= 0, got {max_seq_len!r}")
        max_seq_len = index()
    _require_cuda("paged_attention", q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, cos_sin, positions,
                  out)
    T, Hq, Dh = q.shape
    num_seqs, Hkv = seq_lens.shape[0], k_cache.shape[2]
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
    capacity = block_tables.shape[1] * block_size  # no sequence is longer than its table
    max_len = capacity if max_seq_len is None else min(max_seq_len, capacity)
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


def _cross_attention(q, k, v, *, kv_lens=None, scale=None, out=None, split_size=None):
    """Text queries q [B, S, Hq, Dh] over image keys/values k, v [B, T, Hkv, Dh] -> [B, S, Hq, Dh], not causal;
    kv_lens [B] masks padded image tokens."""
    _require_cuda("cross_attention", q, k, v, out)
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


def _write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, cos_sin=None, positions=None, rotary_dim=None) -> None:
    """k_cache/v_cache[slot // block_size, slot % block_size] = rope(k), v for each token whose slot lies in
    [0, num_blocks * block_size); other slots (-1: padding) are skipped, as in the reference. In place."""
    _require_cuda("write_kv_cache", k, v, k_cache, v_cache, slot_mapping, cos_sin, positions)
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
        return
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


def _patch_embed(pixels, weight, bias, pos_embed, position_ids, *, groups=1, out=None):
    """conv2d(pixels, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos_embed[position_ids] -> [B, N, D]."""
    _require_cuda("patch_embed", pixels, weight, bias, pos_embed, out)
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


def _dwsep_patch_embed(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids, *, out=None):
    """Depthwise P x P conv (stride P), pointwise projection pw_weight [D, C], + pw_bias + pos_embed[position_ids]
    -> [B, N, D] in one kernel."""
    _require_cuda("dwsep_patch_embed", pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, out)
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


# ---------------------------------------------------------------- the table the registry reads

OPS = ("int4_gemm", "paged_attention", "write_kv_cache", "cross_attention", "patch_embed", "dwsep_patch_embed")

def _below(op: str, what: str, t, low: int, high: int) -> None:
    """Every element of index tensor t in [low, high), else a ValueError naming the first one outside."""
    if t is None or t.numel() == 0:
        return
    t = torch.as_tensor(t).reshape(-1).long().cpu()
    bad = ((t < low) | (t >= high)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"ops.{op}: {what}[{i}] = {int(t[i])} is outside [{low}, {high}) "
                         f"({len(bad)} of {t.numel()} elements are; {SYNC_ENV}=1 checked it before the launch)")


def _check_paged(a: dict) -> None:
    block_tables, seq_lens, k_cache = a["block_tables"], a["seq_lens"].long().cpu(), a["k_cache"]
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    _below("paged_attention", "seq_lens", seq_lens, 0, block_tables.shape[1] * block_size + 1)
    for s, n in enumerate(seq_lens.tolist()):
        _below("paged_attention", f"block_tables[{s}]", block_tables[s, :-(-n // block_size)], 0, num_blocks)
    starts = a.get("query_start_loc")
    if starts is not None:
        steps = starts.long().cpu().diff()
        if int(starts[0]) != 0 or int(starts[-1]) != a["q"].shape[0] or (steps < 0).any() or (steps > seq_lens).any():
            raise ValueError(f"ops.paged_attention: query_start_loc must rise from 0 to {a['q'].shape[0]} by at most "
                             f"each sequence's seq_lens ({SYNC_ENV}=1 checked it before the launch)")


def _check_positions(op: str, a: dict) -> None:
    if a.get("cos_sin") is not None:
        _below(op, "positions", a.get("positions"), 0, a["cos_sin"].shape[0])


def check_indices(op: str, *args, **kwargs) -> None:
    """The index arguments of a launch of `op` within what they index (the kernels read them unchecked)."""
    a = inspect.signature(_LAUNCHERS[op]).bind(*args, **kwargs).arguments
    if op == "paged_attention":
        _check_paged(a)
        _check_positions(op, a)
    elif op == "write_kv_cache":
        cache = a["k_cache"]
        _below(op, "slot_mapping", a["slot_mapping"], -1, cache.shape[0] * cache.shape[1])
        _check_positions(op, a)
    elif op == "cross_attention" and a.get("kv_lens") is not None:
        _below(op, "kv_lens", a["kv_lens"], 0, a["k"].shape[1] + 1)
    elif op in ("patch_embed", "dwsep_patch_embed") and a.get("pos_embed") is not None:
        _below(op, "position_ids", a.get("position_ids"), 0, a["pos_embed"].shape[0])


def _synchronized(op: str, launch):
    """launch, and with SMOLVLM_FAST_CUDA_SYNC=1 its indices checked before and the device synchronized after."""
    @functools.wraps(launch)
    def call(*args, **kwargs):
        if os.environ.get(SYNC_ENV) != "1":
            return launch(*args, **kwargs)
        check_indices(op, *args, **kwargs)
        out = launch(*args, **kwargs)
        try:
            torch.cuda.synchronize(args[0].device)
        except RuntimeError as e:
            raise RuntimeError(f"ops.{op}: the CUDA kernel failed: {e} ({SYNC_ENV}=1 synchronized after it)") from e
        return out

    return call


_LAUNCHERS = {"int4_gemm": _int4_gemm, "paged_attention": _paged_attention, "write_kv_cache": _write_kv_cache,
              "cross_attention": _cross_attention, "patch_embed": _patch_embed,
              "dwsep_patch_embed": _dwsep_patch_embed}
# op -> its launcher, for the calls COVERS[op] accepts (the registry has asked COVERS before it calls one)
LAUNCH = {op: _synchronized(op, launch) for op, launch in _LAUNCHERS.items()}


def _checked(name: str):
    """cuda.<name> for callers of this module: the launcher behind its covers predicate (a call outside the kernel
    must never reach a launcher: the kernels trust the sizes they are given)."""
    covers, launch = COVERS[name], LAUNCH[name]

    def call(*args, **kwargs):
        if _C is not None and not covers(*args, **kwargs):
            scope = " ".join(covers.__doc__.split())
            raise ValueError(f"ops.cuda.{name}: this call is outside the CUDA kernel, which covers {scope}; "
                             f"ops.{name}(..., impl=\"cuda\") hands such calls to the next implementation")
        return launch(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = launch.__doc__
    return call


int4_gemm, paged_attention, write_kv_cache, cross_attention, patch_embed, dwsep_patch_embed = map(_checked, OPS)
