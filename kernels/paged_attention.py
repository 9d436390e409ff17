"""Paged attention: decode, chunked prefill and prefill after a cached prefix in one Triton kernel.

Layouts (token-major, smolvlm_fast/ops/README.md; the last dimension of every tensor is contiguous):
  q                [T, Hq, Dh]                         the new query tokens of all sequences, packed
  k_cache/v_cache  [num_blocks, block_size, Hkv, Dh]   keys already rotated when written
  block_tables     [num_seqs, max_blocks] int32         seq_lens [num_seqs] int32 (new tokens included)
  query_start_loc  [num_seqs + 1] int32, or None for one query per sequence (decode)
  cos_sin          [max_pos, rotary_dim]: first half cos, second half sin; positions [T]
  out              [T, Hq, Dh]
  partial_acc      [T, Hq, num_splits, Dh] fp32   partial_max / partial_sum [T, Hq, num_splits] fp32

Query j of sequence s (q_len_s queries) sits at position seq_lens[s] - q_len_s + j and sees the keys at
positions <= its own; a query that sees no key (a padding sequence of length 0) is written as zeros.

Work split. One program per (query tile, kv head, context split). A query tile is BLOCK_Q consecutive
queries of one sequence times the GROUP query heads that share the kv head: the BLOCK_M rows of the
tl.dot (row r = query r // GROUP, head r % GROUP, padded to a power of two >= 16), so each K/V tile is
loaded once for the whole group. Sequence s owns the global tiles from query_start_loc[s] // BLOCK_Q + s
on (found by binary search, no host sync); T // BLOCK_Q + num_seqs tiles cover every layout.
Split i covers the keys [i * split_size, (i + 1) * split_size) (flash-decoding), the last split all keys from
its start on (so a max_seq_len below a real length costs speed, never keys): the attention kernel
writes the split's unnormalised (max, sum, acc) and a second kernel combines the splits. With one split
the attention kernel normalises and writes the output itself. Softmax runs in base 2 with the scale
folded in; scores and accumulators are fp32.
"""
from __future__ import annotations

import functools
import operator
import os

import torch
import triton
import triton.language as tl

from .tuning import space

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SPLIT_SIZE = 512  # vLLM's partition size for split decode
MIN_SPLIT_SIZE = 128  # below this a split's fixed cost (q load, RoPE, partial write) outweighs its keys
PROGRAMS_PER_SM = 2  # how many attention programs per SM the split choice aims for


@triton.jit
def _sequence_of_tile(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence s whose tiles start at or before `tile`: the last s with start_loc[s] // BLOCK_Q + s <= tile."""
    lo = tl.full([], 0, tl.int32)  # first_tile(lo) <= tile always holds (first_tile(0) == 0)
    hi = lo + num_seqs  # first_tile(hi) > tile, or hi == num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= tile:
            lo = mid
        else:
            hi = mid
    return lo.to(tl.int64)


def configs() -> list[triton.Config]:
    """Autotune space over the key tile, warps and pipeline stages; one config in the interpreter. BLOCK_N need
    not divide split_size (the last tile of a split is masked), it only wastes lanes when it does not."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32})]
    return space([triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                  for n in (32, 64) for w in (4, 8) for s in (2, 3) if not (n == 32 and w == 8)],
                 pinned=[triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)])


@triton.autotune(configs=configs(), key=["HEAD_DIM", "GROUP", "PAGE_SIZE", "BLOCK_M", "VARLEN", "ROPE", "SPLIT"])
@triton.jit
def _paged_attention_kernel(
    # pointers
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    cos_sin_ptr, positions_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr,
    # sizes
    num_seqs, split_size, qk_scale,
    # strides
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bts, stride_cs, stride_pat, stride_pah, stride_pas, stride_pmt, stride_pmh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr, ROPE: tl.constexpr,
    ROTARY_DIM: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)

    if VARLEN:
        seq = _sequence_of_tile(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
        q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
        q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int64) - q_start
        q_tile = tile - (q_start // BLOCK_Q + seq)
        if q_tile * BLOCK_Q >= q_len:
            return
    else:
        seq = tile
        q_start = tile
        q_tile = tile * 0
        q_len = q_tile + 1
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)

    # rows of the tile: query (within the sequence) and head
    offs_m = tl.arange(0, BLOCK_M)
    q_row = q_tile * BLOCK_Q + offs_m // GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_row < q_len)
    head = kv_head * GROUP + offs_m % GROUP
    tok = q_start + q_row
    q_pos = seq_len - q_len + q_row  # [BLOCK_M] attends to keys <= q_pos
    offs_d = tl.arange(0, DH_PAD)
    d_ok = offs_d < HEAD_DIM

    q_row_ptrs = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_row_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if ROPE:
        # rotate-half on the first ROTARY_DIM features: x * cos + rotate_half(x) * sin
        HALF: tl.constexpr = ROTARY_DIM // 2
        first = offs_d < HALF
        freq = tl.where(first, offs_d, offs_d - HALF)
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        rot_ok = row_ok[:, None] & (offs_d < ROTARY_DIM)[None, :]
        pos = tl.load(positions_ptr + tok, mask=row_ok, other=0).to(tl.int64)
        table = cos_sin_ptr + pos[:, None] * stride_cs + freq[None, :]
        cos = tl.load(table, mask=rot_ok, other=1.0).to(tl.float32)
        sin = tl.load(table + HALF, mask=rot_ok, other=0.0).to(tl.float32)
        x_partner = tl.load(q_row_ptrs + partner[None, :], mask=rot_ok, other=0.0).to(tl.float32)
        q = q * cos + tl.where(first, -1.0, 1.0)[None, :] * x_partner * sin
    q = q.to(k_cache_ptr.dtype.element_ty)  # the tensor cores' operand type (rounded like the reference)
    if DOT_FP32:  # the interpreter's bf16 tl.dot is wrong: rounded operands, multiplied in fp32
        q = q.to(tl.float32)

    # this split's keys; the tile's last query sees the first kv_len keys of the sequence
    kv_len = seq_len - q_len + tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
    lo = (split * split_size).to(tl.int32)
    last_split = split == tl.num_programs(2) - 1
    hi = tl.where(last_split, kv_len, tl.minimum(lo + split_size, kv_len)).to(tl.int32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, DH_PAD], tl.float32)
    block_row_ptr = block_tables_ptr + seq * stride_bts
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        page = tl.load(block_row_ptr + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        k = tl.load(k_cache_ptr + page[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh
                    + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [DH_PAD, BLOCK_N]
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with no key yet stay all-zero
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                    + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, DH_PAD]
        p = p.to(v_cache_ptr.dtype.element_ty)
        if DOT_FP32:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        # splits past a row's keys store max -inf, sum 0, acc 0: the combine gives them weight 0
        stat = tok * stride_pmt + head * stride_pmh + split
        tl.store(partial_max_ptr + stat, m_i, mask=row_ok)
        tl.store(partial_sum_ptr + stat, l_i, mask=row_ok)
        part = partial_acc_ptr + tok[:, None] * stride_pat + head[:, None] * stride_pah + split * stride_pas
        tl.store(part + offs_d[None, :], acc, mask=out_mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw no key: zeros
        out_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _combine_splits_kernel(
    # pointers
    out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr,
    # sizes
    num_splits,
    # strides
    stride_ot, stride_oh, stride_pat, stride_pah, stride_pas, stride_pmt, stride_pmh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, DH_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, SPLIT_TILE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    stats = tok * stride_pmt + head * stride_pmh

    offs_s = tl.arange(0, SPLITS_PAD)
    s_ok = offs_s < num_splits
    m = tl.load(partial_max_ptr + stats + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(partial_sum_ptr + stats + offs_s, mask=s_ok, other=0.0)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # -inf: the query saw no key (its result is zeros)
    total = tl.sum(tl.exp2(m - m_all) * l, 0)

    offs_d = tl.arange(0, DH_PAD)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([DH_PAD], tl.float32)
    part_row = partial_acc_ptr + tok * stride_pat + head * stride_pah
    for s0 in range(0, num_splits, SPLIT_TILE):
        offs = s0 + tl.arange(0, SPLIT_TILE)
        ok = offs < num_splits
        w = tl.exp2(tl.load(partial_max_ptr + stats + offs, mask=ok, other=float("-inf")) - m_all)
        part = tl.load(part_row + offs[:, None] * stride_pas + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                       other=0.0)  # [SPLIT_TILE, DH_PAD]
        acc += tl.sum(part * w[:, None], 0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def choose_split_size(max_seq_len: int, programs: int, device: torch.device, multi_query: bool = False) -> int:
    """Keys per split: enough splits that programs x splits fills the GPU, each of MIN..MAX_SPLIT_SIZE keys (a
    multiple of 64), so that a long context is spread evenly. Contexts up to MIN_SPLIT_SIZE get one split and no
    combine kernel, and so do multi-query (prefill) launches whose query tiles already fill the GPU: their partial
    results grow with the number of queries, decode's stay a few percent of the K/V read."""
    wanted_splits = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), programs)
    if multi_query and wanted_splits == 1:
        return max(max_seq_len, 1)
    size = triton.cdiv(triton.cdiv(max_seq_len, wanted_splits), 64) * 64
    return max(MIN_SPLIT_SIZE, min(size, MAX_SPLIT_SIZE))


def _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, cos_sin, positions, rotary_dim):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: q must be [T, Hq, Dh] and k/v_cache [num_blocks, block_size, Hkv, Dh], "
                         f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    T, Hq, Dh = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != Dh or Hq % Hkv:
        raise ValueError(f"paged_attention: {Hq} query heads of size {Dh} over cache heads {tuple(k_cache.shape[2:])}")
    if not q.dtype == k_cache.dtype == v_cache.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"paged_attention: q and caches must share fp32/fp16/bf16, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError("paged_attention: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones)")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention: the caches' head_dim must be contiguous")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or seq_lens.dim() != 1:
        raise ValueError(f"paged_attention: block_tables {tuple(block_tables.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)} must be [num_seqs, max_blocks] and [num_seqs]")
    if query_start_loc is None and T != num_seqs:
        raise ValueError(f"paged_attention: without query_start_loc there is one query per sequence, got T={T} "
                         f"for {num_seqs} sequences")
    if query_start_loc is not None and tuple(query_start_loc.shape) != (num_seqs + 1,):
        raise ValueError(f"paged_attention: query_start_loc must be [{num_seqs + 1}], got {tuple(query_start_loc.shape)}")
    if cos_sin is not None:
        if positions is None or tuple(positions.shape) != (T,):
            raise ValueError(f"paged_attention: cos_sin needs positions [{T}]")
        if rotary_dim % 2 or not 0 < rotary_dim <= min(Dh, cos_sin.shape[-1]):
            raise ValueError(f"paged_attention: rotary_dim {rotary_dim} must be even and <= head_dim {Dh} "
                             f"and <= the table's {cos_sin.shape[-1]} columns")


def check_max_seq_len(max_seq_len, seq_lens: torch.Tensor) -> int | None:
    """max_seq_len as an int (None stays None), or a ValueError: it must be >= 0 and, where seq_lens is on the host
    (a free check), >= every length. Device lengths are not checked, as that costs the host sync max_seq_len saves;
    the kernel then still reads every key (its last split runs to the end of the sequence)."""
    if max_seq_len is None:
        return None
    try:
        max_seq_len = operator.index(max_seq_len)
    except TypeError:
        raise ValueError(f"paged_attention: max_seq_len must be an int, got {max_seq_len!r}") from None
    if max_seq_len < 0:
        raise ValueError(f"paged_attention: max_seq_len must be >= 0, got {max_seq_len}")
    if seq_lens.device.type == "cpu" and seq_lens.numel() and int(seq_lens.max()) > max_seq_len:
        raise ValueError(f"paged_attention: max_seq_len {max_seq_len} is below the longest sequence "
                         f"({int(seq_lens.max())} tokens); it must bound every seq_lens entry")
    return max_seq_len


def _launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, cos_sin, positions, rotary_dim, scale,
            out, max_seq_len, split_size):
    T, Hq, Dh = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = Hq // Hkv
    varlen = query_start_loc is not None

    # query tile: the group's heads x BLOCK_Q queries as the M rows of tl.dot (>= 16 rows for tl.dot)
    min_m = max(16, triton.next_power_of_2(group))
    if varlen:
        mean_q = triton.cdiv(T, num_seqs)
        block_m = min(max(min_m, triton.next_power_of_2(mean_q * group)), max(64, min_m))
        block_q = block_m // group
        num_tiles = T // block_q + num_seqs
    else:
        block_m, block_q, num_tiles = min_m, 1, num_seqs

    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())  # one host sync; pass max_seq_len to avoid it (CUDA graphs)
    max_seq_len = max(max_seq_len, 0)
    if split_size is None:
        split_size = choose_split_size(max_seq_len, num_tiles * Hkv, q.device, multi_query=T > num_seqs)
    if split_size < 1:
        raise ValueError(f"paged_attention: split_size must be positive, got {split_size}")
    num_splits = max(1, triton.cdiv(max_seq_len, split_size))

    dummy = q.new_empty(0)
    if num_splits > 1:
        partial_acc = torch.empty(T, Hq, num_splits, Dh, device=q.device, dtype=torch.float32)
        partial_max = torch.empty(T, Hq, num_splits, device=q.device, dtype=torch.float32)
        partial_sum = torch.empty_like(partial_max)
    else:
        partial_acc = partial_max = partial_sum = dummy.float()
    pa_strides = partial_acc.stride()[:3] if num_splits > 1 else (0, 0, 0)
    pm_strides = partial_max.stride()[:2] if num_splits > 1 else (0, 0)
    dh_pad = max(16, triton.next_power_of_2(Dh))

    _paged_attention_kernel[(num_tiles, Hkv, num_splits)](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc if varlen else dummy,
        cos_sin if cos_sin is not None else dummy, positions if positions is not None else dummy,
        partial_acc, partial_max, partial_sum,
        num_seqs, split_size, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), cos_sin.stride(0) if cos_sin is not None else 0, *pa_strides, *pm_strides,
        HEAD_DIM=Dh, DH_PAD=dh_pad, GROUP=group, PAGE_SIZE=page_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, VARLEN=varlen, ROPE=cos_sin is not None, ROTARY_DIM=rotary_dim or 0,
        SPLIT=num_splits > 1, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
    )
    if num_splits > 1:
        splits_pad = triton.next_power_of_2(num_splits)
        _combine_splits_kernel[(T, Hq)](
            out, partial_acc, partial_max, partial_sum,
            num_splits,
            out.stride(0), out.stride(1), *pa_strides, *pm_strides,
            HEAD_DIM=Dh, DH_PAD=dh_pad, SPLITS_PAD=splits_pad, SPLIT_TILE=min(splits_pad, 16),
            num_warps=4,
        )
    return out


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, query_start_loc=None, cos_sin=None,
                    positions=None, rotary_dim=None, scale=None, out=None, max_seq_len=None, split_size=None):
    """Packed queries q [T, Hq, Dh] over the paged cache -> [T, Hq, Dh] (smolvlm_fast/ops/README.md).

    Extensions: `out` [T, Hq, Dh] to write into; `max_seq_len`, an upper bound of seq_lens that sizes the
    context splits so that the launch needs no host sync, as under CUDA graphs (checked against seq_lens when they
    are on the host, see check_max_seq_len); `split_size`, keys per context split (default: from the context length
    and the GPU's size, see choose_split_size).
    """
    if cos_sin is not None:
        rotary_dim = rotary_dim or cos_sin.shape[-1]
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, cos_sin, positions, rotary_dim)
    max_seq_len = check_max_seq_len(max_seq_len, seq_lens)
    T, Hq, Dh = q.shape
    scale = Dh**-0.5 if scale is None else float(scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if cos_sin is not None and cos_sin.stride(-1) != 1:
        cos_sin = cos_sin.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"paged_attention: out must be {tuple(q.shape)} {q.dtype} with contiguous head_dim")
    if T == 0:
        return out
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, cos_sin, positions, rotary_dim,
                   scale, out, max_seq_len, split_size)
