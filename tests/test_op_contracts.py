"""Contract edges every implementation of the attention and cache ops shares (smolvlm_fast/ops/README.md):

- a query that sees no key is 0 (paged_attention, rope_attention, cross_attention), never NaN;
- write_kv_cache skips every slot outside [0, num_blocks * block_size) (-1 is the padding value);
- paged_attention's max_seq_len bounds seq_lens: a bad one is a clear error where the check is free, and the CUDA
  launcher sizes its context splits from it (else from the block tables' capacity), not from nothing; one too small
  drops no key (Triton here, CUDA under the emulator in tests/test_cuda_emu.py).

The reference and the Triton kernels (in Triton's interpreter without a GPU) run here; the CUDA launchers' Python
side runs against a stand-in for smolvlm_fast._C that records the arguments; the CUDA kernels themselves in the
tests marked gpu. Inputs are fresh random (the per-test seed of tests/conftest_seed.py); outputs start as NaN.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from smolvlm_fast.kernels import paged_attention as triton_paged
from smolvlm_fast.kernels.cross_attention import cross_attention as triton_cross_attention
from smolvlm_fast.kernels.rope_attention import rope_attention as triton_rope_attention
from smolvlm_fast.kernels.write_kv_cache import write_kv_cache as triton_write_kv_cache
from smolvlm_fast.ops import cuda, reference

from .kernel_checks import assert_matches_fp32, run_into_nan
from .test_kernel_paged_attention import make_inputs, reference_f64

GPU = pytest.mark.gpu


def assert_zero_rows(out, rows, what):
    """out[rows] (an index into the first dimension) is exactly 0."""
    got = out[rows]
    assert not got.isnan().any() and (got == 0).all(), f"{what}: rows that see no key must be 0, got {got.flatten()[:4]}"


# ---------------------------------------------------------------- paged_attention: a query that sees no key

def padded_batch(seq_lens, q_lens, empty, device="cpu", **kw):
    """make_inputs' caches, with the sequences in `empty` cut to length 0 (a padding entry) and their blocks NaN,
    so reading one of their keys shows."""
    args, kwargs = make_inputs(seq_lens, q_lens, device=device, seed=int(torch.randint(0, 2**31, ())), **kw)
    q, k_cache, v_cache, tables, lens = args
    for s in empty:
        k_cache[tables[s].long()] = float("nan")
        v_cache[tables[s].long()] = float("nan")
        lens[s] = 0
    return (q, k_cache, v_cache, tables, lens), kwargs


def query_rows(q_lens, sequences):
    """The packed rows of the queries of `sequences` (q_lens None: one query each)."""
    counts = q_lens or [1] * 100
    starts = [sum(counts[:s]) for s in range(len(counts) + 1)]
    return [r for s in sequences for r in range(starts[s], starts[s + 1])]


# (seq_lens, q_lens, the sequences made empty): decode with padding entries first, in the middle and last; a
# varlen step with a padding entry (q_len 1 over 0 keys) beside a prefill and a decode row.
NO_KEY = [
    pytest.param([17, 40, 9, 33], None, [0, 2], id="decode"),
    pytest.param([5, 70, 3], None, [2], id="decode-last"),
    pytest.param([12, 30, 50], [12, 1, 4], [1], id="varlen"),
]


@pytest.mark.parametrize("seq_lens, q_lens, empty", NO_KEY)
def test_paged_attention_reference_zero_for_no_key(seq_lens, q_lens, empty):
    args, kwargs = padded_batch(seq_lens, q_lens, empty, rotary_dim=64)
    out = reference_f64(args, kwargs)
    assert_zero_rows(out, query_rows(q_lens, empty), "reference")
    assert not out.isnan().any()


@pytest.mark.parametrize("split_size", [None, 16], ids=["one-split", "split16"])
@pytest.mark.parametrize("seq_lens, q_lens, empty", NO_KEY)
def test_paged_attention_triton_zero_for_no_key(seq_lens, q_lens, empty, split_size):
    """One split (the kernel normalises) and several (the combine kernel): both give 0 where no key is seen."""
    args, kwargs = padded_batch(seq_lens, q_lens, empty, rotary_dim=64)
    out = run_into_nan(triton_paged.paged_attention, args[0], *args, **kwargs, split_size=split_size)
    assert_zero_rows(out, query_rows(q_lens, empty), "triton")
    assert_matches_fp32(out, reference_f64(args, kwargs))


@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split_size", [None, 64])
def test_paged_attention_cuda_zero_for_no_key(dtype, split_size):
    if not cuda.available():
        pytest.skip("smolvlm_fast._C is not built")
    args, kwargs = padded_batch([300, 17, 700, 5], None, [1, 3], device="cuda", rotary_dim=64)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
    out = run_into_nan(cuda.paged_attention, low[0], *low, **kwargs, split_size=split_size)
    assert_zero_rows(out, [1, 3], "cuda")
    assert not out.isnan().any()


# ---------------------------------------------------------------- paged_attention: max_seq_len

def test_max_seq_len_below_a_length_is_an_error():
    """Where seq_lens is on the host the Triton launcher checks max_seq_len for free."""
    args, kwargs = make_inputs([17, 90, 40], None)
    with pytest.raises(ValueError, match=r"max_seq_len 89 is below the longest sequence \(90 tokens\)"):
        triton_paged.paged_attention(*args, **kwargs, max_seq_len=89)
    for bad in (-1, 1.5, "90"):
        with pytest.raises(ValueError, match="max_seq_len must be"):
            triton_paged.paged_attention(*args, **kwargs, max_seq_len=bad)
    out = run_into_nan(triton_paged.paged_attention, args[0], *args, **kwargs, max_seq_len=90)
    assert_matches_fp32(out, reference_f64(args, kwargs))


def test_reference_checks_max_seq_len():
    """The reference takes max_seq_len too (the model passes it to every implementation) and holds it to its
    promise; a bound that holds changes nothing."""
    args, kwargs = make_inputs([17, 90, 40], None)
    for bad in (89, -1, 1.5, "90"):
        with pytest.raises(ValueError, match="max_seq_len must be an int >= 0 that bounds every seq_lens entry"):
            reference.paged_attention(*args, **kwargs, max_seq_len=bad)
    for bound in (90, 1000):
        torch.testing.assert_close(reference.paged_attention(*args, **kwargs, max_seq_len=bound),
                                   reference.paged_attention(*args, **kwargs), rtol=0, atol=0)


def test_cuda_launcher_checks_max_seq_len_before_the_device():
    """The CUDA launcher refuses a max_seq_len that is no length before it looks at devices (no GPU needed)."""
    args, kwargs = make_inputs([17, 90], None)
    for bad in (-3, 2.0, "7"):
        with pytest.raises(ValueError, match="max_seq_len must be an int >= 0"):
            cuda._paged_attention(*args, **kwargs, max_seq_len=bad)


@pytest.mark.parametrize("split_size", [None, 32], ids=["one-split", "split32"])
def test_triton_kernel_reads_every_key_past_max_seq_len(split_size):
    """On the device the promise is not checked (that costs a host sync); the Triton kernel's last split then runs
    to the end of each sequence, so a max_seq_len too small costs speed, not keys."""
    args, kwargs = make_inputs([17, 160, 40], None)
    q = args[0]
    out = torch.full_like(q, float("nan"))
    rotary = kwargs.get("rotary_dim")
    triton_paged._launch(*args, None, None, None, rotary, q.shape[-1] ** -0.5, out, 40, split_size)
    assert_matches_fp32(out, reference_f64(args, kwargs))


class FakeC:
    """A stand-in for smolvlm_fast._C: its *Args types are namespaces, its ops record the call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.endswith("Args"):
            return SimpleNamespace
        return lambda args: self.calls.append((name, args))


@pytest.fixture
def fake_c(monkeypatch):
    """cuda's launchers over CPU tensors with FakeC as _C, on a pretend 132-SM GPU (an H100)."""
    fake = FakeC()
    monkeypatch.setattr(cuda, "_C", fake)
    monkeypatch.setattr(cuda, "_require_cuda", lambda op, *tensors: None)
    monkeypatch.setattr(cuda, "_device", lambda t: 0)
    monkeypatch.setattr(cuda, "_stream", lambda t: 0)
    monkeypatch.setattr(cuda, "_num_sms", lambda device: 132)
    return fake


def wide_table_decode(seq_lens, width):
    """Decode inputs whose block tables are `width` blocks wide (padded, as a CUDA graph's fixed-size tables)."""
    args, kwargs = make_inputs(seq_lens, None)
    q, k_cache, v_cache, tables, lens = args
    wide = torch.zeros(tables.shape[0], width, dtype=torch.int32)
    wide[:, :tables.shape[1]] = tables
    return (q, k_cache, v_cache, wide, lens), kwargs


def test_cuda_splits_from_max_seq_len(fake_c):
    """max_seq_len sizes the splits, not the tables' width: 512 blocks of 16 is 8192 keys, the longest is 300."""
    args, kwargs = wide_table_decode([300, 17], 512)
    cuda._paged_attention(*args, **kwargs, max_seq_len=300)
    sent = fake_c.calls[-1][1]
    expect = cuda.choose_split_size(300, 2 * 3, 0)
    assert (sent.split_size, sent.num_splits) == (expect, -(-300 // expect))


def test_cuda_splits_default_to_table_capacity(fake_c):
    """Without max_seq_len the only bound free of a host sync is the tables' capacity; a max_seq_len above it is
    cut to it (no sequence is longer than its table)."""
    args, kwargs = wide_table_decode([300, 17], 40)  # 640 keys of capacity
    for max_seq_len in (None, 10_000):
        cuda._paged_attention(*args, **kwargs, max_seq_len=max_seq_len)
        sent = fake_c.calls[-1][1]
        expect = cuda.choose_split_size(640, 2 * 3, 0)
        assert (sent.split_size, sent.num_splits) == (expect, -(-640 // expect))


# ---------------------------------------------------------------- write_kv_cache: slots outside the cache

GUARD_BLOCKS = 2


def guarded_caches(num_blocks, block_size, heads, head_dim, dtype=torch.float32):
    """NaN caches [num_blocks, ...] that are views of buffers with GUARD_BLOCKS more blocks after them (NaN too),
    so a write past the cache lands in memory the test can see."""
    shape = (num_blocks + GUARD_BLOCKS, block_size, heads, head_dim)
    buffers = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(2)]
    return buffers, [b[:num_blocks] for b in buffers]


def out_of_range_slots(num_tokens, num_slots):
    """Distinct in-range slots, with some tokens sent past the cache (num_slots, num_slots + 5) or negative."""
    slots = torch.randperm(num_slots)[:num_tokens].to(torch.int32)
    slots[[0, 3, 5, 6]] = torch.tensor([num_slots, -1, num_slots + 5, -7], dtype=torch.int32)
    return slots


def numpy_write_kv_cache(k, v, k_cache, v_cache, slots):
    """The PyTorch-free path's write (cpu/ops.py) into NumPy views of the same caches."""
    from smolvlm_fast.cpu import ops as cpu_ops
    cpu_ops.write_kv_cache(k.numpy(), v.numpy(), k_cache.numpy(), v_cache.numpy(), slots.numpy())


WRITERS = {"reference": reference.write_kv_cache, "triton": triton_write_kv_cache, "numpy": numpy_write_kv_cache}


@pytest.mark.parametrize("impl", list(WRITERS))
def test_write_kv_cache_skips_slots_outside_the_cache(impl):
    num_blocks, block_size, heads, head_dim, T = 3, 16, 3, 64, 10
    k, v = torch.randn(T, heads, head_dim), torch.randn(T, heads, head_dim)
    slots = out_of_range_slots(T, num_blocks * block_size)
    buffers, caches = guarded_caches(num_blocks, block_size, heads, head_dim)
    WRITERS[impl](k, v, *caches, slots)
    keep = (slots >= 0) & (slots < num_blocks * block_size)
    for buffer, cache, x in zip(buffers, caches, (k, v)):
        assert buffer[num_blocks:].isnan().all(), "a slot past the cache was written out of bounds"
        flat = cache.reshape(-1, heads, head_dim)
        assert torch.equal(flat[slots[keep].long()], x[keep])
        written = torch.zeros(flat.shape[0], dtype=torch.bool)
        written[slots[keep].long()] = True
        assert flat[~written].isnan().all(), "a slot no token maps to was written"


def test_cuda_write_kv_cache_tells_the_kernel_the_cache_size(fake_c):
    """The CUDA kernel skips slot >= num_blocks * block_size: its launcher must pass the cache's real size."""
    k, v = torch.randn(4, 3, 64), torch.randn(4, 3, 64)
    k_cache, v_cache = torch.empty(5, 16, 3, 64), torch.empty(5, 16, 3, 64)
    cuda._write_kv_cache(k, v, k_cache, v_cache, torch.tensor([0, 80, -1, 79], dtype=torch.int32))
    sent = fake_c.calls[-1][1]
    assert (sent.num_blocks, sent.block_size) == (5, 16)


@GPU
def test_cuda_write_kv_cache_skips_slots_outside_the_cache():
    if not cuda.available():
        pytest.skip("smolvlm_fast._C is not built")
    num_blocks, block_size, heads, head_dim, T = 3, 16, 3, 64, 10
    k, v = (torch.randn(T, heads, head_dim, device="cuda", dtype=torch.float16) for _ in range(2))
    slots = out_of_range_slots(T, num_blocks * block_size).cuda()
    buffers = [torch.full((num_blocks + GUARD_BLOCKS, block_size, heads, head_dim), float("nan"), device="cuda",
                          dtype=torch.float16) for _ in range(2)]
    caches = [b[:num_blocks] for b in buffers]
    cuda.write_kv_cache(k, v, *caches, slots)
    expect = [torch.full_like(c, float("nan")) for c in caches]
    reference.write_kv_cache(k, v, *expect, slots)
    for buffer, cache, ref in zip(buffers, caches, expect):
        assert buffer[num_blocks:].isnan().all()
        torch.testing.assert_close(cache, ref, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- rope_attention and cross_attention

def key_mask_without_keys(B, S):
    """Batch row 0 may attend no key at all; in row 1 the first 5 keys are masked, so under a causal mask its first
    5 queries see none; row 2 is a random mask with key 0 kept."""
    mask = torch.rand(B, S) < 0.6
    mask[0] = False
    mask[1, :5] = False
    mask[1, 5:] = True
    mask[2, 0] = True
    return mask


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_rope_attention_zero_for_no_key(impl, causal):
    B, S, Hq, Hkv, Dh = 3, 21, 9, 3, 64
    q, k, v = torch.randn(B, S, Hq, Dh), torch.randn(B, S, Hkv, Dh), torch.randn(B, S, Hkv, Dh)
    key_mask = key_mask_without_keys(B, S)
    kwargs = dict(causal=causal, key_mask=key_mask, seq_lens=torch.tensor([S, S, S - 4], dtype=torch.int32))
    expect = reference.rope_attention(q.double(), k.double(), v.double(), **kwargs)
    if impl == "reference":
        out = reference.rope_attention(q, k, v, **kwargs)
    else:
        out = run_into_nan(triton_rope_attention, q, q, k, v, **kwargs)
    assert_zero_rows(out[0], slice(None), impl)
    if causal:
        assert_zero_rows(out[1], slice(0, 5), impl)
    assert_zero_rows(out[2], slice(S - 4, None), impl)  # past seq_len
    assert_matches_fp32(out, expect)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_cross_attention_zero_for_no_key(impl):
    """kv_len 0 (a text row with no image) is 0, beside rows with image tokens; NaN past kv_len is never read."""
    B, S, T, Hq, Hkv, Dh = 3, 2, 40, 9, 3, 64
    q, k, v = torch.randn(B, S, Hq, Dh), torch.randn(B, T, Hkv, Dh), torch.randn(B, T, Hkv, Dh)
    kv_lens = torch.tensor([0, 23, 0], dtype=torch.int32)
    for b, n in enumerate(kv_lens.tolist()):
        k[b, n:] = v[b, n:] = float("nan")
    expect = reference.cross_attention(q.double(), k.double(), v.double(), kv_lens=kv_lens)
    if impl == "reference":
        out = reference.cross_attention(q, k, v, kv_lens=kv_lens)
    else:
        out = run_into_nan(triton_cross_attention, q, q, k, v, kv_lens=kv_lens)
    assert_zero_rows(out, [0, 2], impl)
    assert_matches_fp32(out, expect)


@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_cross_attention_zero_for_no_key(dtype):
    if not cuda.available():
        pytest.skip("smolvlm_fast._C is not built")
    B, S, T, Hq, Hkv, Dh = 3, 1, 300, 9, 3, 64
    q = torch.randn(B, S, Hq, Dh, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, T, Hkv, Dh, device="cuda", dtype=dtype) for _ in range(2))
    kv_lens = torch.tensor([0, 200, 0], dtype=torch.int32, device="cuda")
    out = run_into_nan(cuda.cross_attention, q, q, k, v, kv_lens=kv_lens)
    assert_zero_rows(out, [0, 2], "cuda")
    assert not out.isnan().any()
