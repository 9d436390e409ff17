"""Flash attention forward with rotate-half RoPE applied as tiles load: q/k/v token-major, GQA, causal or not.

Layout (token-major, any strides):
    q   [B, S, Hq, Dh]      k, v  [B, S, Hkv, Dh]      out  [B, S, Hq, Dh]
    cos_sin [max_pos, R]    first R/2 columns cos, last R/2 sin; only the first R = rotary_dim features rotate
    positions [B, S]        seq_lens [B]        key_mask [B, S] (bool; True = may be attended)

Work split. Grid (cdiv(S·G, BLOCK_M), B·Hkv) with G = Hq / Hkv: one program owns BLOCK_M rows of one KV head's
query group, row r being (token r // G, query head kvh·G + r % G), so query head h reads KV head h // G (as
repeat_interleave does in the reference) and the G heads that share a K/V tile load it once (GQA packing).
Keys are walked BLOCK_N at a time with the online softmax (no score matrix in memory) in two stages: the blocks
no mask can touch (before the tile's first token when causal, before the last full block of seq_len), then
the few boundary blocks with the causal / length masks; causal tiles stop at their last token, so fully masked
key blocks are never loaded. RoPE rotates the q tile once and every K tile as it loads: x·cos + sign·partner·sin
with partner(d) = d ± rotary_dim/2 (a second load of the same rows) and cos/sin gathered from the table at the
rows' positions. Scores are scaled by scale·log2(e) and exponentiated with exp2; accumulation is fp32.
BLOCK_D is head_dim rounded up to a power of two, at least 16 (72 and 80 pad to 128, masked). BLOCK_M (16 for
decode-sized work, 64 or 128 otherwise), BLOCK_N, warps and stages are autotuned per size class.

A query row that may see no key at all (every key masked by key_mask, or a row past seq_len) is written as
zeros, as PyTorch's SDPA does (a plain softmax over no key would give NaN).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .tuning import space

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------- shared @triton.jit helpers

@triton.jit
def _group_rows(n_tokens, N_KV_HEADS, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's work, from the grid (query tiles, batch x KV heads): (pid_m, batch b, kv_head, and per
    row [BLOCK_M] its token, its query head kv_head * GROUP + g, and whether the token exists)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // N_KV_HEADS
    kv_head = pid_bh % N_KV_HEADS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    return pid_m, b, kv_head, token, kv_head * GROUP + rows % GROUP, token < n_tokens


@triton.jit
def _load_rows(x_ptr, row_off, row_mask, offs_d, stride_d, pos, cs_ptr, stride_cs_pos, stride_cs_d,
               HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, ROPE: tl.constexpr, MASK_ROWS: tl.constexpr):
    """[R, BLOCK_D] tile x[row_off + d * stride_d] (zero past HEAD_DIM and on masked rows), rotated at
    positions pos [R] on its first ROTARY_DIM features when ROPE: x*cos + sign*partner*sin, where
    partner(d) = d ± ROTARY_DIM/2 and sign is - on the first half, + on the second."""
    mask = offs_d[None, :] < HEAD_DIM
    if MASK_ROWS:
        mask = mask & row_mask[:, None]
    x = tl.load(x_ptr + row_off[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    if ROPE:
        HALF: tl.constexpr = ROTARY_DIM // 2
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        freq = tl.where(first, offs_d, offs_d - HALF)
        rot = offs_d[None, :] < ROTARY_DIM
        if MASK_ROWS:
            rot = rot & row_mask[:, None]
        x_partner = tl.load(x_ptr + row_off[:, None] + partner[None, :] * stride_d, mask=rot, other=0.0)
        cs = cs_ptr + pos[:, None] * stride_cs_pos + freq[None, :] * stride_cs_d
        cos = tl.load(cs, mask=rot, other=1.0).to(tl.float32)
        sin = tl.load(cs + HALF * stride_cs_d, mask=rot, other=0.0).to(tl.float32)
        sign = tl.where(first, -1.0, 1.0)
        x = (x.to(tl.float32) * cos + sign[None, :] * x_partner.to(tl.float32) * sin).to(x.dtype)
    return x


@triton.jit
def _attend_blocks(acc, m_i, l_i, q, row_token, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                   pos_ptr, stride_pos, cs_ptr, stride_cs_pos, stride_cs_d, key_mask_ptr, stride_mask,
                   start, end, kv_len, qk_scale,
                   HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   ROPE: tl.constexpr, CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, KEY_MASK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Online softmax over keys [start, end), BLOCK_N at a time. q [BLOCK_M, BLOCK_D] (already rotated; its
    dtype is the one the products take, K, V and P are cast to it),
    acc [BLOCK_M, BLOCK_D] / m_i, l_i [BLOCK_M] fp32 in base 2. CAUSAL masks keys after row_token, BOUNDS keys
    at or past kv_len, KEY_MASK keys whose key_mask byte is 0. Masked scores are -inf; a row that has seen
    only -inf keeps m_i = -inf, l_i = 0, acc = 0 (no NaN: exponents are taken against a finite stand-in)."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_bounds = offs_n < kv_len
        pos = offs_n  # unused without ROPE
        if ROPE:
            if BOUNDS:
                pos = tl.load(pos_ptr + offs_n * stride_pos, mask=in_bounds, other=0)
            else:
                pos = tl.load(pos_ptr + offs_n * stride_pos)
        k = _load_rows(k_ptr, offs_n.to(tl.int64) * stride_kn, in_bounds, offs_d, stride_kd, pos, cs_ptr,
                       stride_cs_pos, stride_cs_d, HEAD_DIM, ROTARY_DIM, ROPE=ROPE, MASK_ROWS=BOUNDS)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= row_token[:, None], s, float("-inf"))
        if BOUNDS:
            s = tl.where(in_bounds[None, :], s, float("-inf"))
        if KEY_MASK:
            if BOUNDS:
                keep = tl.load(key_mask_ptr + offs_n * stride_mask, mask=in_bounds, other=0)
            else:
                keep = tl.load(key_mask_ptr + offs_n * stride_mask)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_finite = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_finite[:, None])
        alpha = tl.math.exp2(m_i - m_finite)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptr, offs_n.to(tl.int64) * stride_vn, in_bounds, offs_d, stride_vd, pos, cs_ptr,
                       stride_cs_pos, stride_cs_d, HEAD_DIM, ROTARY_DIM, ROPE=False, MASK_ROWS=BOUNDS)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_rows(out_ptr, row_off, row_mask, acc, l_i, stride_od, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[row] = acc / l for the valid rows; rows with l = 0 (no key seen) are zeros."""
    offs_d = tl.arange(0, BLOCK_D)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(out_ptr + row_off[:, None] + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask)


def configs() -> list[triton.Config]:
    """Autotune space: 16-row tiles for decode-sized work, 64 or 128 rows otherwise. The interpreter gets one
    small config of each kind (its programs run one after another; 32 rows make small tests cross tile edges)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": 16}) for bm in (16, 32)]
    return space([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                  for bm in (16, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)
                  if (w == 4 or bm == 128) and (bm == 16 or (bn < 128 and s == 3))],
                 pinned=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=2),  # decode-sized
                         triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)])


def prune_configs(configs, named_args, **kwargs):
    """Size class 0 (at most 16 rows per KV head) keeps the 16-row configs, the others the rest."""
    decode = named_args["size_class"] == 0
    return [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == decode]


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def size_class(rows: int, programs_per_row_tile: int, device: torch.device) -> int:
    """The autotuning key's size: 0 for decode-sized work (rows <= 16 per KV head), 1 when 128-row tiles
    would leave SMs idle (fewer than two programs per SM), 2 otherwise."""
    if rows <= 16:
        return 0
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1 if triton.cdiv(rows, 128) * programs_per_row_tile < 2 * sms else 2


# ---------------------------------------------------------------- kernel

@triton.autotune(configs=configs(), key=["size_class", "BLOCK_D", "CAUSAL", "ROPE", "KEY_MASK"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=["size_class"])
def _rope_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cs_ptr, pos_ptr, seq_lens_ptr, key_mask_ptr,
    S, N_KV_HEADS, qk_scale, size_class,  # size_class: the autotuning key only
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_cs_pos, stride_cs_d, stride_pb, stride_ps, stride_mb, stride_ms,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, SEQ_LENS: tl.constexpr, KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m, b, kv_head, token, head, row_valid = _group_rows(S, N_KV_HEADS, GROUP, BLOCK_M)

    kv_len = S
    if SEQ_LENS:
        kv_len = tl.minimum(tl.load(seq_lens_ptr + b).to(tl.int64), S)
    first_token = pid_m * BLOCK_M // GROUP
    last_token = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, S - 1)
    full_end = kv_len // BLOCK_N * BLOCK_N  # keys before it need no length mask
    if CAUSAL:
        end = tl.minimum(kv_len, last_token + 1)
        mid = tl.minimum((first_token + 1) // BLOCK_N * BLOCK_N, full_end)  # no causal mask before it either
    else:
        end = kv_len
        mid = full_end
    past_len = first_token >= kv_len  # the whole tile is past seq_len: zeros
    end = tl.where(past_len, 0, end)
    mid = tl.where(past_len, 0, mid)

    pos_row = pos_ptr + b * stride_pb
    pos_q = token  # unused without ROPE
    if ROPE:
        pos_q = tl.load(pos_row + token * stride_ps, mask=row_valid, other=0)
    q_row_off = b * stride_qb + token * stride_qs + head * stride_qh
    q = _load_rows(q_ptr, q_row_off, row_valid, tl.arange(0, BLOCK_D), stride_qd, pos_q, cs_ptr,
                   stride_cs_pos, stride_cs_d, HEAD_DIM, ROTARY_DIM, ROPE=ROPE, MASK_ROWS=True)
    if DOT_FP32:
        q = q.to(tl.float32)

    k_head = k_ptr + b * stride_kb + kv_head * stride_kh
    v_head = v_ptr + b * stride_vb + kv_head * stride_vh
    mask_row = key_mask_ptr + b * stride_mb
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, token, k_head, v_head, stride_ks, stride_kd, stride_vs,
                                   stride_vd, pos_row, stride_ps, cs_ptr, stride_cs_pos, stride_cs_d, mask_row,
                                   stride_ms, 0, mid, kv_len, qk_scale, HEAD_DIM, ROTARY_DIM, BLOCK_N, BLOCK_D,
                                   ROPE=ROPE, CAUSAL=False, BOUNDS=False, KEY_MASK=KEY_MASK,
                                   DOT_PRECISION=DOT_PRECISION)
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, token, k_head, v_head, stride_ks, stride_kd, stride_vs,
                                   stride_vd, pos_row, stride_ps, cs_ptr, stride_cs_pos, stride_cs_d, mask_row,
                                   stride_ms, mid, end, kv_len, qk_scale, HEAD_DIM, ROTARY_DIM, BLOCK_N, BLOCK_D,
                                   ROPE=ROPE, CAUSAL=CAUSAL, BOUNDS=True, KEY_MASK=KEY_MASK,
                                   DOT_PRECISION=DOT_PRECISION)
    if SEQ_LENS:
        acc = tl.where((token < kv_len)[:, None], acc, 0.0)
    out_row_off = b * stride_ob + token * stride_os + head * stride_oh
    _store_rows(out_ptr, out_row_off, row_valid, acc, l_i, stride_od, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------- launcher

def block_d(head_dim: int) -> int:
    """The feature tile: head_dim rounded up to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_options(dtype: torch.dtype) -> dict:
    """fp32 products in IEEE fp32 (no TF32: the GPU then matches the interpreter's exact fp32); fp16/bf16 on
    the tensor cores. The interpreter's tl.dot is wrong for bf16 operands, so there they are cast to fp32."""
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_FP32": INTERPRET and dtype == torch.bfloat16}


def check_attention_inputs(q, k, v, out):
    """Shapes, dtypes and devices shared by the attention launchers; returns (B, S, Hq, Hkv, Dh)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, S, Hq, Dh] and k, v [B, T, Hkv, Dh]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, S, Hq, Dh = q.shape
    Hkv = k.shape[2]
    if k.shape[0] != B or k.shape[3] != Dh or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (Hq must be a multiple of Hkv)")
    if not 0 < Dh <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {Dh} outside 1..{MAX_HEAD_DIM}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError("Triton attention needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")
    return B, S, Hq, Hkv, Dh


def _as_index(x, name, shape, device):
    x = torch.as_tensor(x, device=device)
    if tuple(x.shape) != shape or x.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32/int64 of shape {shape}; got {x.dtype} {tuple(x.shape)}")
    return x


def rope_attention(q, k, v, *, cos_sin=None, positions=None, rotary_dim=None, causal=True, scale=None,
                   seq_lens=None, key_mask=None, out=None):
    """Attention of q [B, S, Hq, Dh] over k, v [B, S, Hkv, Dh] -> [B, S, Hq, Dh] (see the module docstring).

    cos_sin [max_pos, R] with positions [B, S]: rotate-half RoPE on q and k's first rotary_dim (default R)
    features. seq_lens [B]: keys past it are ignored, rows past it are zeros. key_mask [B, S] bool: keys that
    may be attended; a row with none is zeros. out: an optional [B, S, Hq, Dh] tensor to write into.
    """
    B, S, Hq, Hkv, Dh = check_attention_inputs(q, k, v, out)
    if k.shape[1] != S:
        raise ValueError(f"k/v have {k.shape[1]} tokens, q has {S}")
    scale = Dh**-0.5 if scale is None else float(scale)
    out = torch.empty_like(q) if out is None else out
    if B * S * Hq == 0:
        return out

    rope = cos_sin is not None
    if rope:
        rotary_dim = rotary_dim or cos_sin.shape[-1]
        if cos_sin.dim() != 2 or rotary_dim % 2 or not 0 < rotary_dim <= min(Dh, cos_sin.shape[-1]):
            raise ValueError(f"rotary_dim {rotary_dim} must be even, at most head_dim {Dh} and the table's "
                             f"width; cos_sin is {tuple(cos_sin.shape)}")
        positions = _as_index(positions, "positions", (B, S), q.device)
        cos_sin = cos_sin.to(q.device)
    else:
        rotary_dim, cos_sin, positions = 0, q, q  # unread placeholders
    if seq_lens is not None:
        seq_lens = _as_index(seq_lens, "seq_lens", (B,), q.device)
    if key_mask is not None:
        key_mask = torch.as_tensor(key_mask, device=q.device)
        if tuple(key_mask.shape) != (B, S) or key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be bool of shape {(B, S)}; got {key_mask.dtype} {tuple(key_mask.shape)}")
        key_mask = key_mask.view(torch.uint8)
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)

    group = Hq // Hkv
    grid = lambda meta: (triton.cdiv(S * group, meta["BLOCK_M"]), B * Hkv)  # noqa: E731
    _rope_attention_kernel[grid](
        q, k, v, out, cos_sin, positions, q if seq_lens is None else seq_lens, q if key_mask is None else key_mask,
        S, Hkv, scale * LOG2E, size_class(S * group, B * Hkv, q.device),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *(cos_sin.stride() if rope else (0, 0)), *(positions.stride() if rope else (0, 0)), *mask_strides,
        GROUP=group, HEAD_DIM=Dh, ROTARY_DIM=rotary_dim,
        BLOCK_D=block_d(Dh),
        CAUSAL=bool(causal), ROPE=rope, SEQ_LENS=seq_lens is not None, KEY_MASK=key_mask is not None,
        **dot_options(q.dtype),
    )
    return out
