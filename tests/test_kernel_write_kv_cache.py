"""Triton write_kv_cache (RoPE on k, both caches in one pass) against the PyTorch reference.

The caches are NaN-poisoned: the written slots must match the reference and every other slot must stay NaN.
Tolerances as in test_kernels_small_ops: fp32 within 1e-6 of the fp32 reference; fp16 / bf16 by
FlashAttention's rule against the fp64 reference; v (and k without RoPE) is a copy and must be bit-exact.
"""
from __future__ import annotations

import pytest
import torch

from smolvlm_fast.ops import reference
from tests.test_kernels_small_ops import DEVICE_DTYPES, assert_error_within

MAX_POSITION, THETA = 300, 10000.0


def nan_cache(num_blocks, block_size, heads, head_dim, dtype, device):
    return torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=dtype, device=device)


def make_slots(num_tokens, num_blocks, block_size, device, dtype=torch.int32):
    """Distinct slots spread over several blocks, both edges of a block among them, and two -1 (skipped)."""
    edges = torch.tensor([block_size - 1, block_size])  # the last slot of block 0, the first of block 1
    others = torch.randperm(num_blocks * block_size)
    others = others[(others != edges[0]) & (others != edges[1])]
    slots = torch.cat([edges, others[:num_tokens - 2]])
    slots[[3, num_tokens - 1]] = -1
    return slots.to(dtype=dtype, device=device)


def run_both(k, v, slots, shape, rope):
    """(kernel caches, reference caches in k's dtype, reference caches in fp64) for the same inputs."""
    from smolvlm_fast.kernels.write_kv_cache import write_kv_cache

    def caches(dtype):
        return nan_cache(*shape, dtype, k.device), nan_cache(*shape, dtype, k.device)

    ours, plain, exact = caches(k.dtype), caches(k.dtype), caches(torch.float64)
    write_kv_cache(k, v, *ours, slots, **rope)
    reference.write_kv_cache(k, v, *plain, slots, **rope)
    reference.write_kv_cache(k.double(), v.double(), *exact, slots, **rope)
    return ours, plain, exact


@pytest.mark.parametrize("heads, head_dim", [(3, 64), (3, 80), (1, 64), (5, 32)], ids=lambda x: str(x))
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("rotary", ["none", "full", "half"])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_write_kv_cache(heads, head_dim, block_size, rotary, device, dtype):
    num_tokens, num_blocks = 9, 4
    shape = (num_blocks, block_size, heads, head_dim)
    k = torch.randn(num_tokens, heads, head_dim, device=device).to(dtype)
    v = torch.randn(num_tokens, heads, head_dim, device=device).to(dtype)
    slots = make_slots(num_tokens, num_blocks, block_size, device)
    rope = {}
    if rotary != "none":
        rotary_dim = head_dim if rotary == "full" else head_dim // 2
        rope = {"cos_sin": reference.rope_table(rotary_dim, MAX_POSITION, THETA, device=device),
                "positions": torch.randint(0, MAX_POSITION, (num_tokens,), dtype=torch.int32, device=device),
                "rotary_dim": rotary_dim}

    (k_cache, v_cache), (k_plain, v_plain), (k_exact, _) = run_both(k, v, slots, shape, rope)

    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    written[slots[slots >= 0].long()] = True
    for cache in (k_cache, v_cache):
        flat = cache.flatten(0, 1)  # [num_slots, Hkv, Dh]
        assert flat[~written].isnan().all(), "a slot that was not in slot_mapping changed"
        assert torch.isfinite(flat[written]).all(), "a written slot was left (partly) NaN"
    assert torch.equal(v_cache.flatten(0, 1)[written], v_plain.flatten(0, 1)[written])  # a copy: bit-exact

    ours, plain, exact = (c.flatten(0, 1)[written] for c in (k_cache, k_plain, k_exact))  # [n, Hkv, Dh]
    if rotary == "none":
        assert torch.equal(ours, plain)
    elif dtype == torch.float32:
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    else:
        assert_error_within(ours, exact, plain)
    if rotary == "half":  # the features past rotary_dim are copied unchanged
        d = rope["rotary_dim"]
        assert torch.equal(ours[..., d:], plain[..., d:])


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES[:1] + DEVICE_DTYPES[3:4])
def test_write_kv_cache_strided_inputs(device, dtype):
    """k and v as slices of a fused qkv projection [T, Hq + 2 Hkv, Dh] (9 query heads, 3 KV heads), int64 slots
    and positions, and a cache viewed from a larger buffer (a block stride bigger than block_size * Hkv * Dh)."""
    from smolvlm_fast.kernels.write_kv_cache import write_kv_cache

    num_tokens, hq, hkv, head_dim, block_size = 6, 9, 3, 64, 16
    qkv = torch.randn(num_tokens, hq + 2 * hkv, head_dim, device=device).to(dtype)
    k, v = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    slots = make_slots(num_tokens, 3, block_size, device, dtype=torch.int64)
    rope = {"cos_sin": reference.rope_table(head_dim, MAX_POSITION, THETA, device=device),
            "positions": torch.randint(0, MAX_POSITION, (num_tokens,), device=device)}

    buffer = torch.full((3, block_size + 2, hkv, head_dim), float("nan"), dtype=dtype, device=device)
    k_cache, v_cache = buffer[:, :block_size], nan_cache(3, block_size, hkv, head_dim, dtype, device)
    write_kv_cache(k, v, k_cache, v_cache, slots, **rope)
    k_ref, v_ref = (nan_cache(3, block_size, hkv, head_dim, dtype, device) for _ in range(2))
    reference.write_kv_cache(k, v, k_ref, v_ref, slots, **rope)

    torch.testing.assert_close(k_cache, k_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    assert buffer[:, block_size:].isnan().all(), "wrote outside the cache view"


def test_write_kv_cache_checks_shapes():
    from smolvlm_fast.kernels.write_kv_cache import write_kv_cache

    k = v = torch.randn(4, 3, 64)
    cache = torch.zeros(2, 16, 3, 64)
    slots = torch.arange(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="caches"):
        write_kv_cache(k, v, torch.zeros(2, 16, 3, 80), cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, v, cache, cache.clone(), slots[:3])
    with pytest.raises(ValueError, match="rotary_dim"):
        write_kv_cache(k, v, cache, cache.clone(), slots, cos_sin=torch.randn(10, 64), positions=slots, rotary_dim=66)
    with pytest.raises(ValueError, match="positions"):
        write_kv_cache(k, v, cache, cache.clone(), slots, cos_sin=torch.randn(10, 64))
