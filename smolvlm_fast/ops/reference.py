"""PyTorch reference implementations of every op in smolvlm_fast/ops/README.md (plain torch, any device).

They are the contract the Triton and CUDA kernels are tested against, and what the model runs where no
kernel exists. Layouts are token-major: attention tensors are [..., tokens, heads, head_dim].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- small ops

def rms_norm(x, weight, eps, residual=None):
    """y = weight * x / rms(x), computed in fp32 as transformers' LlamaRMSNorm; with residual, (y, x + residual)."""
    if residual is not None:
        x = x + residual
    variance = x.float().pow(2).mean(-1, keepdim=True)
    y = weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    return y if residual is None else (y, x)


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def silu_and_mul(x):
    gate, up = x.chunk(2, dim=-1)  # [..., 2I] -> 2 x [..., I]
    return F.silu(gate) * up


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# ---------------------------------------------------------------- vision

def patch_embed(pixels, weight, bias, pos_embed, position_ids, *, groups=1):
    patch = weight.shape[-1]
    out = F.conv2d(pixels, weight, bias, stride=patch, groups=groups)  # [B, D, H/P, W/P]
    return _add_positions(out.flatten(2).transpose(1, 2), pos_embed, position_ids)  # [B, N, D]


def dwsep_patch_embed(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids):
    depthwise = patch_embed(pixels, dw_weight, dw_bias, None, None, groups=pixels.shape[1])  # [B, N, C]
    return _add_positions(F.linear(depthwise, pw_weight, pw_bias), pos_embed, position_ids)  # [B, N, D]


def _add_positions(x, pos_embed, position_ids):
    """x [B, N, D] + pos_embed[position_ids]; position_ids None means arange(N)."""
    if pos_embed is None:
        return x
    if position_ids is None:
        position_ids = torch.arange(x.shape[1], device=x.device)[None]
    return x + pos_embed[position_ids]


# ---------------------------------------------------------------- rotary embedding

def rope_table(rotary_dim: int, max_position: int, theta: float, device=None) -> torch.Tensor:
    """[max_position, rotary_dim]: first half cos, second half sin, in fp32 as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim))
    freqs = torch.arange(max_position, device=device, dtype=torch.float32)[:, None] * inv_freq[None]  # [P, R/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(x, cos_sin, positions, rotary_dim=None):
    """Rotate-half RoPE on the first rotary_dim features of each head. x [T, H, Dh], positions [T]."""
    rotary_dim = rotary_dim or cos_sin.shape[-1]
    half = rotary_dim // 2
    table = cos_sin[positions.long()].to(x.dtype)  # [T, R]
    cos, sin = table[:, None, :half], table[:, None, half:rotary_dim]  # [T, 1, R/2]
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


# ---------------------------------------------------------------- attention

def _attend(q, k, v, mask, scale):
    """q [Sq, Hq, Dh], k/v [Sk, Hkv, Dh], mask [Sq, Sk] bool (True = attend) or None -> [Sq, Hq, Dh].

    PyTorch's SDPA (the math transformers runs too), with GQA inside it rather than by copying K/V heads. A query
    row that sees no key is 0 (the contract of every attention op), set here rather than left to SDPA's backend.
    """
    if k.shape[0] == 0:
        return torch.zeros_like(q)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale, enable_gqa=True)  # [1, Hq, Sq, Dh]
    out = out[0].transpose(0, 1)
    if mask is not None:
        out = out.masked_fill(~mask.any(-1)[:, None, None], 0)  # [Sq] rows with no key -> 0
    return out


def rope_attention(q, k, v, *, cos_sin=None, positions=None, rotary_dim=None, causal=True, scale=None,
                   seq_lens=None, key_mask=None):
    """q [B, S, Hq, Dh], k/v [B, S, Hkv, Dh] -> [B, S, Hq, Dh].

    key_mask [B, S] bool (extension): keys that may be attended, for the vision encoder's 2-D patch masks.
    """
    B, S, Hq, Dh = q.shape
    scale = Dh**-0.5 if scale is None else scale
    if cos_sin is not None:
        pos = positions.reshape(-1)
        q = apply_rope(q.reshape(B * S, Hq, Dh), cos_sin, pos, rotary_dim).reshape(q.shape)
        k = apply_rope(k.reshape(B * S, -1, Dh), cos_sin, pos, rotary_dim).reshape(k.shape)
    idx = torch.arange(S, device=q.device)
    out = torch.empty_like(q)
    for b in range(B):
        keep = torch.ones(S, S, dtype=torch.bool, device=q.device)
        if causal:
            keep &= idx[None, :] <= idx[:, None]
        if seq_lens is not None:
            keep &= idx[None, :] < seq_lens[b]
        if key_mask is not None:
            keep &= key_mask[b][None, :]
        out[b] = _attend(q[b], k[b], v[b], None if bool(keep.all()) else keep, scale)
        if seq_lens is not None:
            out[b, max(0, int(seq_lens[b])):] = 0
    return out


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, cos_sin=None, positions=None, rotary_dim=None):
    """k/v [T, Hkv, Dh] -> k_cache/v_cache [num_blocks, block_size, Hkv, Dh] at slot_mapping [T].

    A slot outside [0, num_blocks * block_size) skips its token (-1 is the padding value)."""
    if cos_sin is not None:
        k = apply_rope(k, cos_sin, positions, rotary_dim)
    keep = (slot_mapping >= 0) & (slot_mapping < k_cache.shape[0] * k_cache.shape[1])
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, query_start_loc=None, cos_sin=None,
                    positions=None, rotary_dim=None, scale=None, max_seq_len=None):
    """Packed queries q [T, Hq, Dh] over the paged cache -> [T, Hq, Dh].

    Query j of sequence s (q_len_s queries) sits at position seq_lens[s] - q_len_s + j and sees keys <= it; a query
    at a negative position (seq_lens[s] < q_len_s, e.g. a padding sequence of length 0) sees none and is 0.
    max_seq_len: the caller's bound of every seq_lens entry (the kernels size their splits by it); here it only
    has to hold, and is checked, since this reads seq_lens on the host anyway.
    """
    T, Hq, Dh = q.shape
    block_size = k_cache.shape[1]
    scale = Dh**-0.5 if scale is None else scale
    if cos_sin is not None:
        q = apply_rope(q, cos_sin, positions, rotary_dim)
    if query_start_loc is None:
        query_start_loc = torch.arange(T + 1, device=q.device)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    _check_bound(max_seq_len, lens)
    out = torch.empty_like(q)
    for s, seq_len in enumerate(lens):
        seq_len = max(0, seq_len)
        q_s = q[starts[s]:starts[s + 1]]  # [q_len, Hq, Dh]
        blocks = block_tables[s, :(seq_len + block_size - 1) // block_size].long()
        k_s = k_cache[blocks].flatten(0, 1)[:seq_len]  # [seq_len, Hkv, Dh]
        v_s = v_cache[blocks].flatten(0, 1)[:seq_len]
        q_pos = seq_len - q_s.shape[0] + torch.arange(q_s.shape[0], device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        out[starts[s]:starts[s + 1]] = _attend(q_s, k_s.to(q.dtype), v_s.to(q.dtype), mask, scale)
    return out


def _check_bound(max_seq_len, lens: list[int]) -> None:
    """A ValueError unless max_seq_len is None or an int >= 0 that bounds every length."""
    if max_seq_len is None:
        return
    bound = getattr(max_seq_len, "__index__", None)  # ints, NumPy ints
    if bound is None or bound() < 0 or max(lens, default=0) > bound():
        raise ValueError(f"paged_attention: max_seq_len must be an int >= 0 that bounds every seq_lens entry "
                         f"(longest {max(lens, default=0)}), got {max_seq_len!r}")


def cross_attention(q, k, v, *, kv_lens=None, scale=None):
    """Text queries q [B, S, Hq, Dh] over image keys/values k/v [B, T, Hkv, Dh], not causal."""
    B, S, _, Dh = q.shape
    scale = Dh**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    for b in range(B):
        n = k.shape[1] if kv_lens is None else min(max(0, int(kv_lens[b])), k.shape[1])
        out[b] = _attend(q[b], k[b, :n], v[b, :n], None, scale)  # n = 0 (no image token): 0, no update
    return out


# ---------------------------------------------------------------- int4 weights

def dequantize_int4(w) -> torch.Tensor:
    """An int4 weight (int4_linear.Int4Tensors; layout in smolvlm_fast/formats/int4.py) as float32 [N, K]."""
    N, K, G = w.N, w.K, w.group_size
    blocks = w.qweight.reshape(N, K // 32, 1, 16)  # byte j of a block: element j low, element j + 16 high
    q = torch.cat([blocks & 0x0F, blocks >> 4], dim=2).view(N, K // G, G).float()  # [N, groups, G]
    d = w.scales.float()[..., None]
    out = d * (q - 8) if w.symmetric else d * q + w.mins.float()[..., None]
    return out.view(N, K)


def int4_gemm(x, w, bias=None):
    """x [M, K] @ dequantize_int4(w).T (+ bias) -> [M, N] in x's dtype, accumulated in fp32 (fp64 for fp64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ dequantize_int4(w).to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
