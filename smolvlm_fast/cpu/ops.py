"""NumPy implementations of the ops in smolvlm_fast/ops/README.md (the PyTorch-free path), float32
throughout; the paged KV cache float32 or float16 (kv_cache_dtype), a float16 cache widened wherever it is read.

Same arguments and meaning as ops/reference.py: token-major layouts ([..., tokens, heads, head_dim]), int32 index
arrays. Attention computes each KV head with its group of query heads together (GQA), never repeating K/V.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..errors import InputError
from .native import _cpu  # None when the extension is not built: the NumPy code runs instead

MAX_SCORES = 1 << 20  # attention scores computed at a time (4 MB of float32): long prompts go in query chunks

# ---------------------------------------------------------------- small ops


def rms_norm(x, weight, eps, residual=None):
    """y = weight * x / rms(x); with residual, (y, x + residual) where the sum is what is normalized."""
    if residual is not None:
        x = x + residual  # [..., D]
    ms = np.vecdot(x, x)[..., None] * (1.0 / x.shape[-1])  # [..., 1] mean square
    y = x / np.sqrt(ms + eps)  # [..., D]
    y *= weight
    return y if residual is None else (y, x)


def layer_norm(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis: the C++ kernel (small_ops.cpp) when the
    extension has it and the arrays suit it (float32, x contiguous), else layer_norm_numpy."""
    rows = None if weight is None else _cpp_rows("layer_norm", x, weight, bias)
    if rows is None:
        return layer_norm_numpy(x, weight, bias, eps)
    out = np.empty(x.shape, dtype=np.float32)
    _cpu.layer_norm(rows, weight, bias, float(eps), out.reshape(rows.shape))
    return out


def layer_norm_numpy(x, weight, bias, eps):
    mean = np.add.reduce(x, axis=-1, keepdims=True) / x.shape[-1]  # [..., 1]
    xc = x - mean  # [..., D]
    var = np.add.reduce(xc * xc, axis=-1, keepdims=True) / x.shape[-1]  # [..., 1]
    var += eps
    np.sqrt(var, out=var)
    xc /= var
    xc *= weight
    if bias is not None:
        xc += bias
    return xc


def silu_and_mul(x):
    """x [..., 2I] (gate, up) -> silu(gate) * up [..., I]."""
    half = x.shape[-1] // 2
    return silu_mul(x[..., :half], x[..., half:])


def silu_mul(gate, up):
    """silu(gate) * up for separate gate and up [..., I]."""
    half = gate * 0.5
    out = np.tanh(half)
    out += 1.0
    out *= half  # silu(x) = x sigmoid(x) = x/2 (1 + tanh(x/2)): no exp to overflow
    out *= up
    return out


def gelu_tanh(x, *, bias=None, out=None):
    """0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) with z = x (+ bias [D], added first); out (optional, may be
    x) receives it. The C++ kernel (small_ops.cpp) when the extension has it and the arrays suit it, else
    gelu_tanh_numpy."""
    rows = _cpp_rows("gelu_tanh", x, bias)
    if rows is None or (out is not None and not _suits_out(out, x)):
        return gelu_tanh_numpy(x, bias=bias, out=out)
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    _cpu.gelu_tanh(rows, bias, out.reshape(rows.shape))
    return out


def gelu_tanh_numpy(x, *, bias=None, out=None):
    if bias is not None:
        x = x + bias  # [..., D]
    inner = x * x
    inner *= 0.044715 * math.sqrt(2 / math.pi)
    inner += math.sqrt(2 / math.pi)
    inner *= x
    np.tanh(inner, out=inner)
    inner += 1.0
    inner *= x
    inner *= 0.5
    if out is None:
        return inner
    out[...] = inner
    return out


def _cpp_rows(name: str, x, *vectors):
    """x as [M, D] rows for _cpu.<name>, or None where the extension lacks it or the arrays do not suit it
    (float32, x C-contiguous and not empty, each vector None or a contiguous float32 [D])."""
    if getattr(_cpu, name, None) is None or not isinstance(x, np.ndarray) or x.dtype != np.float32:
        return None
    if x.ndim == 0 or x.size == 0 or not x.flags.c_contiguous:
        return None
    D = x.shape[-1]
    for v in vectors:
        if v is not None and not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (D,)
                                  and v.flags.c_contiguous):
            return None
    return x.reshape(-1, D)


def _suits_out(out, x) -> bool:
    """out is a C-contiguous float32 array of x's shape that is x itself or shares no memory with it."""
    return (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == x.shape
            and out.flags.c_contiguous and out.flags.writeable
            and (out.ctypes.data == x.ctypes.data or not np.may_share_memory(out, x)))


# ---------------------------------------------------------------- vision


def patch_embed(pixels, weight, bias, pos_embed, position_ids, *, groups=1):
    """pixels [B, C, H, W], weight [D, C/groups, P, P] -> [B, N, D]: a stride-P conv as one GEMM over patches."""
    B, C, H, W = pixels.shape
    D, P = weight.shape[0], weight.shape[-1]
    h, w = H // P, W // P
    patches = pixels[:, :, :h * P, :w * P].reshape(B, C, h, P, w, P).transpose(0, 2, 4, 1, 3, 5)  # [B, h, w, C, P, P]
    patches = patches.reshape(B * h * w, groups, (C // groups) * P * P)  # [B*N, g, C/g*P*P]
    if groups == 1:
        out = patches[:, 0] @ weight.reshape(D, -1).T  # [B*N, D]
    else:
        kernels = weight.reshape(groups, D // groups, -1)  # [g, D/g, C/g*P*P]
        out = np.einsum("ngk,gdk->ngd", patches, kernels).reshape(B * h * w, D)  # [B*N, D]
    out = out.reshape(B, h * w, D)
    if bias is not None:
        out += bias
    return _add_positions(out, pos_embed, position_ids)


def dwsep_patch_embed(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids):
    depthwise = patch_embed(pixels, dw_weight, dw_bias, None, None, groups=pixels.shape[1])  # [B, N, C]
    out = depthwise @ pw_weight.T  # [B, N, D]
    if pw_bias is not None:
        out += pw_bias
    return _add_positions(out, pos_embed, position_ids)


def _add_positions(x, pos_embed, position_ids):
    """x [B, N, D] += pos_embed[position_ids]; position_ids None means arange(N)."""
    if pos_embed is None:
        return x
    x += pos_embed[:x.shape[1]] if position_ids is None else pos_embed[position_ids]
    return x


# ---------------------------------------------------------------- rotary embedding


def rope_table(rotary_dim: int, max_position: int, theta: float) -> np.ndarray:
    """[max_position, rotary_dim]: first half cos, second half sin, float32 rounding as transformers computes them
    (inv_freq and the angles in float32; cos/sin correctly rounded from those float32 angles)."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)  # [R/2]
    inv_freq = np.float32(1.0) / (float(theta) ** exponent.astype(np.float64)).astype(np.float32)  # [R/2]
    freqs = np.arange(max_position, dtype=np.float32)[:, None] * inv_freq[None]  # [P, R/2] float32
    freqs = freqs.astype(np.float64)
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=-1).astype(np.float32)  # [P, R]


def rope_factors(cos_sin, positions, rotary_dim=None):
    """RoPE of positions [T] as two [T, 1, 2, R/2] factors for `rotate`: (cos, cos) and (-sin, sin).
    cos_sin [P, R] is rope_table(R, ...): rotary_dim, when given, must be its width R (cos | sin halves)."""
    if rotary_dim is not None and rotary_dim != cos_sin.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} must equal the width of the cos/sin table {cos_sin.shape[-1]} "
                         "(make the table with rope_table(rotary_dim, ...))")
    rotary_dim = cos_sin.shape[-1]
    half = rotary_dim // 2
    table = cos_sin[positions]  # [T, R]
    cos, sin = table[:, :half], table[:, half:rotary_dim]  # [T, R/2]
    return np.stack([cos, cos], 1)[:, None], np.stack([-sin, sin], 1)[:, None]  # [T, 1, 2, R/2] x 2


def rotate(x, cos, sin):
    """x [T, H, Dh] -> a new array, its first R features rotated (x1 cos - x2 sin, x2 cos + x1 sin); cos/sin from
    rope_factors, R = 2 * cos.shape[-1]."""
    T, H, Dh = x.shape
    half = cos.shape[-1]
    halves = x[..., :2 * half].reshape(T, H, 2, half)  # [T, H, (x1, x2), R/2]
    out = halves * cos
    out += halves[:, :, ::-1] * sin  # (x2, x1) * (-sin, sin)
    out = out.reshape(T, H, 2 * half)
    return out if 2 * half == Dh else np.concatenate([out, x[..., 2 * half:]], axis=-1)


def apply_rope(x, cos_sin, positions, rotary_dim=None):
    """Rotate-half RoPE on the first rotary_dim features of each head. x [T, H, Dh], positions [T] -> new array."""
    return rotate(np.asarray(x, dtype=np.float32), *rope_factors(cos_sin, positions, rotary_dim))


# ---------------------------------------------------------------- attention


def attend(q, k, v, mask, scale):
    """q [Sq, Hq, Dh], k/v [Sk, Hkv, Dh], mask [Sq, Sk] bool (True = attend) or None -> [Sq, Hq, Dh].

    Each KV head meets its G = Hq / Hkv query heads in one matmul: no repeated K/V.
    """
    Sq, Hq, Dh = q.shape
    Sk, Hkv, _ = k.shape
    G = Hq // Hkv
    qg = q.reshape(Sq, Hkv, G, Dh).transpose(1, 0, 2, 3).reshape(Hkv, Sq * G, Dh) * np.float32(scale)  # [Hkv, Sq*G, Dh]
    scores = np.matmul(qg, k.transpose(1, 2, 0))  # [Hkv, Sq*G, Sk]
    if mask is not None:
        np.copyto(scores.reshape(Hkv, Sq, G, Sk), -np.inf, where=~mask[:, None, :])  # masked keys -> -inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)  # unnormalized probabilities
    total = np.add.reduce(scores, axis=-1, keepdims=True)  # [Hkv, Sq*G, 1]
    out = np.matmul(scores, v.transpose(1, 0, 2))  # [Hkv, Sq*G, Dh]
    out /= total
    return out.reshape(Hkv, Sq, G, Dh).transpose(1, 0, 2, 3).reshape(Sq, Hq, Dh)  # [Sq, Hq, Dh]


def rope_attention(q, k, v, *, cos_sin=None, positions=None, rotary_dim=None, causal=True, scale=None,
                   seq_lens=None, key_mask=None):
    """q [B, S, Hq, Dh], k/v [B, S, Hkv, Dh] -> [B, S, Hq, Dh]. key_mask [B, S] bool: keys that may be attended."""
    B, S, Hq, Dh = q.shape
    scale = Dh**-0.5 if scale is None else scale
    if cos_sin is not None:
        pos = np.asarray(positions).reshape(-1)
        q = apply_rope(q.reshape(B * S, Hq, Dh), cos_sin, pos, rotary_dim).reshape(q.shape)
        k = apply_rope(k.reshape(B * S, -1, Dh), cos_sin, pos, rotary_dim).reshape(k.shape)
    kernel = _cpp_kernel("paged_prefill_attention", q, k, v)
    if kernel is not None and seq_lens is None and key_mask is None and S > 1:
        return _dense_attention_in_cpp(kernel, q, k, v, causal, scale)
    idx = np.arange(S)
    out = np.empty(q.shape, dtype=np.float32)
    for b in range(B):
        keep = np.ones((S, S), dtype=bool)
        if causal:
            keep &= idx[None, :] <= idx[:, None]
        if seq_lens is not None:
            keep &= idx[None, :] < seq_lens[b]
        if key_mask is not None:
            keep &= key_mask[b][None, :]
        mask = None if keep.all() else keep
        for c0, c1 in query_chunks(S, Hq, S):
            out[b, c0:c1] = attend(q[b, c0:c1], k[b], v[b], None if mask is None else mask[c0:c1], scale)
        if seq_lens is not None:
            out[b, int(seq_lens[b]):] = 0
    return out


def _dense_attention_in_cpp(kernel, q, k, v, causal: bool, scale: float):
    """rope_attention without padding through the C++ paged prefill attention: each batch row's K/V [S, Hkv, Dh] is
    one cache block of S slots, its S queries one sequence (causal: query j sees keys <= j)."""
    B, S, Hq, Dh = q.shape
    out = np.empty((B * S, Hq, Dh), dtype=np.float32)
    kernel(np.ascontiguousarray(q).reshape(B * S, Hq, Dh), np.ascontiguousarray(k), np.ascontiguousarray(v),
           np.arange(B, dtype=np.int32).reshape(B, 1), np.full(B, S, dtype=np.int32),
           np.arange(B + 1, dtype=np.int32) * S, float(scale), out, causal=causal)
    return out.reshape(B, S, Hq, Dh)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, cos_sin=None, positions=None, rotary_dim=None):
    """k/v [T, Hkv, Dh] -> k_cache/v_cache [num_blocks, block_size, Hkv, Dh] at slot_mapping [T]; a slot outside
    [0, num_blocks * block_size) skips its token (-1 is the padding value), as in every implementation.
    A float16 cache takes them rounded to nearest (NumPy's cast, as the C++ step's F16C one)."""
    _check_kv_pair("write_kv_cache", k_cache, v_cache)
    if cos_sin is not None:
        k = apply_rope(k, cos_sin, positions, rotary_dim)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if len(slot_mapping) and (slot_mapping.min() < 0 or slot_mapping.max() >= num_slots):
        keep = (slot_mapping >= 0) & (slot_mapping < num_slots)
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    for new, cache in ((k, k_cache), (v, v_cache)):
        if cache.flags.c_contiguous:
            cache.reshape(-1, *cache.shape[2:])[slot_mapping] = new  # [slots, Hkv, Dh]: a view of the cache
        else:
            block_size = cache.shape[1]
            cache[slot_mapping // block_size, slot_mapping % block_size] = new


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, query_start_loc=None, cos_sin=None,
                    positions=None, rotary_dim=None, scale=None, plan=None):
    """Packed queries q [T, Hq, Dh] over the paged cache -> [T, Hq, Dh].

    Query j of sequence s (q_len_s queries) sits at position seq_lens[s] - q_len_s + j and sees keys <= it.
    Runs in C++ (_cpu: paged_decode_attention, paged_prefill_attention) when the extension is there, else NumPy.
    plan (extension): paged_plan() of this step's metadata for the NumPy code, computed once and shared by every layer.
    """
    T, Hq, Dh = q.shape
    scale = Dh**-0.5 if scale is None else scale
    if cos_sin is not None:
        q = apply_rope(q, cos_sin, positions, rotary_dim)
    _check_kv_pair("paged_attention", k_cache, v_cache)
    decode = is_decode(T, seq_lens, query_start_loc)
    kernel = _cpp_kernel("paged_decode_attention" if decode else "paged_prefill_attention", q, k_cache, v_cache)
    if kernel is not None and (decode or query_start_loc is not None):
        out = np.empty((T, Hq, Dh), dtype=np.float32)
        metadata = [np.ascontiguousarray(a, dtype=np.int32) for a in (block_tables, seq_lens)]  # [S, max_blocks], [S]
        if not decode:
            metadata.append(np.ascontiguousarray(query_start_loc, dtype=np.int32))  # [S + 1]
        kernel(np.ascontiguousarray(q), k_cache, v_cache, *metadata, float(scale), out)
        return out
    if plan is None:
        plan = paged_plan(block_tables, seq_lens, query_start_loc, k_cache.shape[1], Hq)
    keys, values = k_cache.reshape(-1, *k_cache.shape[2:]), v_cache.reshape(-1, *v_cache.shape[2:])  # [slots, Hkv, Dh]
    if len(plan) == 1 and len(plan[0][1]) == 1:  # one sequence, one chunk: no copy into `out`
        slots, ((a, b, end, mask),) = plan[0]
        return attend(q, _widen(keys[slots][:end]), _widen(values[slots][:end]), mask, scale)
    out = np.empty((T, Hq, Dh), dtype=np.float32)
    for slots, chunks in plan:
        k, v = _widen(keys[slots]), _widen(values[slots])  # [seq_len, Hkv, Dh]: a view of consecutive float32 blocks
        for a, b, end, mask in chunks:
            out[a:b] = attend(q[a:b], k[:end], v[:end], mask, scale)
    return out


def kv_cache_zeros(shape, dtype=np.float32) -> np.ndarray:
    """A zeroed cache [num_blocks, block_size, Hkv, Dh] of dtype (float32 or float16) that starts on a 64-byte
    boundary.

    NumPy's large arrays start 16 bytes past one, so every cache row the C++ attention reads straddles two cache
    lines (decode about 15% slower when the cache is in L2).
    """
    dtype = np.dtype(dtype)
    if dtype.name not in KV_DTYPES:
        raise InputError(f"kv_cache_zeros: dtype must be one of {', '.join(KV_DTYPES)}, got {dtype}")
    n, size = math.prod(shape), dtype.itemsize
    raw = np.zeros(n + 64 // size, dtype)
    start = (-raw.ctypes.data % 64) // size  # elements to the next 64-byte boundary
    return raw[start:start + n].reshape(shape)


# The KV cache's dtypes. float16, not bfloat16, for the 16-bit cache: 3 more mantissa bits (about 8x smaller
# logit error: bench/kv16_precision.py) and one instruction to widen (F16C). Its range (65504) is safe: the
# norm's output has rms 1, so |k| <= max |k_proj row| * max |input norm weight| * sqrt(hidden), and RoPE adds at
# most sqrt(2); for SmolLM2-135M (SmolVLM-256M's decoder) that bounds |K| by 376 and |V| by 187, and on text it
# writes at most 23 and 15.
KV_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
KV_DTYPE_ENV = "SMOLVLM_FAST_KV_DTYPE"


def kv_cache_dtype(option: str | None = None, precision: str | None = None, quantized: bool = False) -> np.dtype:
    """The KV cache's dtype: `option` (a KV_DTYPES name) when given, else $SMOLVLM_FAST_KV_DTYPE when set, else
    float16 for a model of precision "bfloat16" (weights rounded to 8 significant bits; K/V rounded to float16's
    11 add less) or one whose decoder is quantized (int4 / Q8_0 weights, as llama.cpp, whose cache is float16 by
    default: on SmolLM2-135M Q4_1 the float16 cache moves the logits by 2.8e-4 of their range after 1,088 tokens,
    bench/kv16_precision.py), else float32 (exact, and the default for float32 models)."""
    name, source = option, "kv_dtype"
    if name is None and os.environ.get(KV_DTYPE_ENV):
        name, source = os.environ[KV_DTYPE_ENV], KV_DTYPE_ENV
    if name is None:
        name = "float16" if precision == "bfloat16" or quantized else "float32"
    if name not in KV_DTYPES:
        raise InputError(f"{source} must be one of {', '.join(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


def _check_kv_pair(fn: str, k_cache, v_cache) -> None:
    """k_cache and v_cache: arrays of one KV_DTYPES dtype."""
    if not (isinstance(k_cache, np.ndarray) and isinstance(v_cache, np.ndarray)):
        raise InputError(f"{fn}: k_cache and v_cache must be NumPy arrays")
    if k_cache.dtype.name not in KV_DTYPES or v_cache.dtype != k_cache.dtype:
        raise InputError(f"{fn}: k_cache and v_cache must both be float32 or both float16, got {k_cache.dtype} "
                         f"and {v_cache.dtype}")


def _widen(x: np.ndarray) -> np.ndarray:
    """Cache rows as float32 (a float16 cache's, converted)."""
    return x if x.dtype == np.float32 else x.astype(np.float32)


def is_decode(T: int, seq_lens, query_start_loc) -> bool:
    """One query per sequence (a decode step): query_start_loc None or 0, 1, ..., T."""
    if T != len(seq_lens):
        return False
    if query_start_loc is None:
        return True
    qsl = np.asarray(query_start_loc)
    if len(qsl) != T + 1 or qsl[0] != 0 or qsl[T] != T:
        return False
    return T < 2 or bool((qsl[1:] > qsl[:-1]).all())  # T steps from 0 to T, each >= 1: all of them 1


def _cpp_kernel(name: str, q, k_cache, v_cache):
    """_cpu.<name> when the extension has it and the arrays suit it (float32 q, contiguous float32 or float16
    caches of one dtype), else None."""
    kernel = getattr(_cpu, name, None)
    suits = (q.dtype == np.float32 and k_cache.dtype in (np.float32, np.float16) and v_cache.dtype == k_cache.dtype
             and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous)
    return kernel if suits else None


def paged_plan(block_tables, seq_lens, query_start_loc, block_size: int, heads: int) -> list:
    """What paged_attention does for each sequence, from the step's metadata alone: (slots, chunks) with
    slots the cache slots of its keys (a slice when its blocks are consecutive, else an index array [seq_len]) and
    chunks [(a, b, end, mask)]: packed queries a..b-1 see keys < end, under mask [b - a, end] (None: all of them)."""
    seq_lens = np.asarray(seq_lens).tolist()
    starts = range(len(seq_lens) + 1) if query_start_loc is None else np.asarray(query_start_loc).tolist()
    plan = []
    for s, seq_len in enumerate(seq_lens):
        blocks = np.asarray(block_tables[s, :-(-seq_len // block_size)], dtype=np.int64)  # [n_blocks]
        if (np.diff(blocks) == 1).all():
            slots = slice(int(blocks[0]) * block_size, int(blocks[0]) * block_size + seq_len)
        else:
            slots = (blocks[:, None] * block_size + np.arange(block_size)).reshape(-1)[:seq_len]  # [seq_len]
        a, b = starts[s], starts[s + 1]
        first = seq_len - (b - a)  # position of the sequence's first new query
        chunks = []
        for c0, c1 in query_chunks(b - a, heads, seq_len):
            end = first + c1  # the chunk's queries see keys < end
            mask = None  # a single query sees every key before it
            if c1 - c0 > 1:
                mask = np.arange(end)[None, :] <= np.arange(first + c0, end)[:, None]  # [c1 - c0, end]
            chunks.append((a + c0, a + c1, end, mask))
        plan.append((slots, chunks))
    return plan


def query_chunks(n_queries: int, heads: int, n_keys: int):
    """[start, end) ranges of queries whose score matrices stay under MAX_SCORES elements."""
    step = max(1, MAX_SCORES // (heads * max(n_keys, 1)))
    return [(c0, min(c0 + step, n_queries)) for c0 in range(0, n_queries, step)]


def cross_attention(q, k, v, *, kv_lens=None, scale=None):
    """Text queries q [B, S, Hq, Dh] over image keys/values k/v [B, T, Hkv, Dh], not causal."""
    B, S, Hq, Dh = q.shape
    scale = Dh**-0.5 if scale is None else scale
    out = np.empty(q.shape, dtype=np.float32)
    for b in range(B):
        n = k.shape[1] if kv_lens is None else int(kv_lens[b])
        if n == 0:
            out[b] = 0  # no image tokens: nothing to add
            continue
        for c0, c1 in query_chunks(S, Hq, n):  # a long prompt's scores [Hq, S, n] in pieces
            out[b, c0:c1] = attend(q[b, c0:c1], k[b, :n], v[b, :n], None, scale)
    return out
