"""The reference ops against independent formulas (transformers' modules and dense attention).

Outputs are NaN-poisoned where the op writes into a buffer; inputs are fresh random tensors.
"""
import pytest
import torch
import torch.nn.functional as F

from smolvlm_fast import ops
from smolvlm_fast.engine.cache import PagedCache, schedule_step


def dense_attention(q, k, v, mask):
    """q [S, Hq, D], k/v [S, Hkv, D], mask [S, S] -> [S, Hq, D] in float64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def hf_rope(x, positions, theta):
    """transformers' rotate-half RoPE: x [T, H, D]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    freqs = positions.float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    q, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None])
    return q[0].transpose(0, 1)


def test_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x, r = torch.randn(7, 576), torch.randn(7, 576)
    norm = LlamaRMSNorm(576, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-5), norm(x))
    y, s = ops.rms_norm(x, norm.weight, 1e-5, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, norm(x + r))


def test_small_ops():
    x = torch.randn(5, 2 * 80)
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(x[:, :80]) * x[:, 80:])
    torch.testing.assert_close(ops.gelu_tanh(x), 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))))
    w, b = torch.randn(160), torch.randn(160)
    expect = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6) * w + b
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-6), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 80])
def test_rope_matches_transformers(head_dim):
    x, pos = torch.randn(11, 3, head_dim), torch.randint(0, 500, (11,))
    table = ops.rope_table(head_dim, 512, 100000.0)
    torch.testing.assert_close(ops.reference.apply_rope(x, table, pos), hf_rope(x, pos, 100000.0))


@pytest.mark.parametrize("groups", [1, 3])
def test_patch_embed(groups):
    pixels = torch.randn(2, 3, 32, 48)
    weight, bias = torch.randn(12, 3 // groups, 16, 16), torch.randn(12)
    pos_embed, pos_ids = torch.randn(10, 12), torch.randint(0, 10, (2, 6))
    out = ops.patch_embed(pixels, weight, bias, pos_embed, pos_ids, groups=groups)
    patches = pixels.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 3, 256)
    w = weight.reshape(12, 3 // groups, 256)
    expect = torch.stack([torch.einsum("bnk,dk->bnd", patches[:, :, c], w[:, c % (3 // groups)]) for c in range(3)], 0)
    if groups == 1:
        expect = expect.sum(0)
    else:  # output channel d reads input channel d // (12 / 3)
        expect = torch.stack([expect[d // 4, :, :, d] for d in range(12)], -1)
    torch.testing.assert_close(out, expect + bias + pos_embed[pos_ids], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_rope_attention_against_dense(causal):
    B, S, Hq, Hkv, D = 3, 13, 9, 3, 64
    q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    seq_lens = torch.tensor([13, 5, 1])
    out = ops.rope_attention(q, k, v, causal=causal, seq_lens=seq_lens)
    for b, n in enumerate(seq_lens.tolist()):
        mask = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
        torch.testing.assert_close(out[b, :n].double(), dense_attention(q[b, :n], k[b, :n], v[b, :n], mask), rtol=1e-5, atol=1e-5)
        assert (out[b, n:] == 0).all()


@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention_equals_dense_causal(block_size):
    """Sequences ending mid-block and on a block edge, one much longer; prefill then decode, q and k rotated."""
    Hq, Hkv, D, theta = 9, 3, 64, 100000.0
    lens = [block_size, block_size + 5, 4 * block_size + 3, 1]
    table = ops.rope_table(D, 512, theta)
    cache = PagedCache(num_blocks=64, block_size=block_size)
    k_cache = torch.full((64, block_size, Hkv, D), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    qs, ks, vs = ([torch.randn(n + 1, h, D) for n in lens] for h in (Hq, Hkv, Hkv))
    for step in ("prefill", "decode"):
        take = (lambda t, n: t[:n]) if step == "prefill" else (lambda t, n: t[n:n + 1])
        meta = schedule_step(cache, {s: (n if step == "prefill" else 1) for s, n in enumerate(lens)})
        i32 = lambda x: torch.tensor(x, dtype=torch.int32)
        pos = i32(meta.positions)
        q, k, v = (torch.cat([take(t, n) for t, n in zip(ts, lens)]) for ts in (qs, ks, vs))
        ops.write_kv_cache(k, v, k_cache, v_cache, i32(meta.slot_mapping), cos_sin=table, positions=pos)
        out = ops.paged_attention(q, k_cache, v_cache, i32(meta.block_tables), i32(meta.seq_lens),
                                  query_start_loc=i32(meta.query_start_loc), cos_sin=table, positions=pos)
        for s, n in enumerate(lens):
            total = meta.seq_lens[s]
            qr = hf_rope(qs[s][:total], torch.arange(total), theta)
            kr = hf_rope(ks[s][:total], torch.arange(total), theta)
            expect = dense_attention(qr, kr, vs[s][:total], torch.ones(total, total, dtype=torch.bool).tril())
            lo, hi = meta.query_start_loc[s], meta.query_start_loc[s + 1]
            torch.testing.assert_close(out[lo:hi].double(), expect[total - (hi - lo):], rtol=1e-5, atol=1e-5)


def test_write_kv_cache_skips_negative_slots():
    k_cache = torch.full((2, 4, 1, 8), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    k, v = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    ops.write_kv_cache(k, v, k_cache, v_cache, torch.tensor([5, -1, 0], dtype=torch.int32))
    torch.testing.assert_close(k_cache[1, 1], k[0])
    torch.testing.assert_close(v_cache[0, 0], v[2])
    assert torch.isnan(k_cache).sum() == (8 - 2) * 8


def test_cross_attention_masks_padded_image_tokens():
    q, k, v = torch.randn(2, 3, 9, 64), torch.randn(2, 10, 3, 64), torch.randn(2, 10, 3, 64)
    out = ops.cross_attention(q, k, v, kv_lens=torch.tensor([10, 4]))
    for b, n in enumerate([10, 4]):
        expect = dense_attention(q[b], k[b, :n], v[b, :n], torch.ones(3, n, dtype=torch.bool))
        torch.testing.assert_close(out[b].double(), expect, rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="not available"):
        ops.gelu_tanh(torch.randn(3), impl="cuda")  # no CUDA kernels yet


def test_the_registry_walks_one_order_and_explains_it():
    """CPU tensors: every op runs its reference, the implementations are listed in the order tried, and
    ops.explain gives each one's verdict (the kernels are on another device) and what it covers."""
    x, w = torch.randn(4, 64), torch.randn(64)
    for name in ops.OPS:
        names = ops.available(name)
        assert names == sorted(names, key=ops.ORDER.index) and names[-1] == "reference", names
    why = ops.explain("rms_norm", x, w, 1e-5).splitlines()
    assert why[0] == "ops.rms_norm(float32 [4, 64] on cpu, ...) runs reference"
    assert [line.split()[0] for line in why[1:]] == ops.available("rms_norm")
    assert why[-1].split()[1] == "runs" and all("not on cuda" in line for line in why[1:-1])
    with ops.prefer("reference"):
        assert "(forced: 'reference')" in ops.explain("rms_norm", x, w, 1e-5).splitlines()[0]
