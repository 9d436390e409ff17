"""The Triton rope_attention kernel against the PyTorch reference in float64.

Without a GPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes, in fp32
within 1e-5 relative, and in fp16/bf16 under the 2x-PyTorch-error rule; the interpreter's blocks are BLOCK_M = 32
rows (about 10 tokens of a 3-head group) and BLOCK_N = 16 keys, so S = 37 ends mid-block and S = 32 on a block
edge. Every input is fresh random and the output starts as NaN, so an element the kernel never writes fails.
"""
import pytest
import torch

from smolvlm_fast.kernels.rope_attention import rope_attention
from smolvlm_fast.ops import reference

from .kernel_checks import assert_matches_fp32, run_into_nan

GPU = pytest.mark.gpu


def make_inputs(B, S, Hq, Hkv, Dh, *, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, Dh, generator=gen) for H in (Hq, Hkv, Hkv))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def rope_kwargs(B, S, rotary_dim, device="cpu", seed=1):
    """A table of S + 50 positions and shuffled positions [B, S] (prefill after a cached prefix, or packed)."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(S + 50, generator=gen)[:S] for _ in range(B)]).to(torch.int32)
    table = reference.rope_table(rotary_dim, S + 50, 10000.0)
    return {"cos_sin": table.to(device), "positions": positions.to(device), "rotary_dim": rotary_dim}


def reference_f64(q, k, v, **kwargs):
    cpu = {name: (x.cpu().double() if name == "cos_sin" else x.cpu() if torch.is_tensor(x) else x)
           for name, x in kwargs.items()}
    return reference.rope_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), **cpu)


def run_kernel(q, k, v, **kwargs):
    return run_into_nan(rope_attention, q, q, k, v, **kwargs)


def check_gpu_case(q, k, v, kwargs, dtype):
    """The kernel against the float64 reference: fp32 within 1e-5, low precision by FlashAttention's rule."""
    out = run_kernel(q, k, v, **kwargs)
    expect = reference_f64(q, k, v, **kwargs)
    if dtype == torch.float32:
        assert_matches_fp32(out, expect)
    else:
        assert_within_twice_torch(out, expect, reference.rope_attention(q, k, v, **kwargs))


def assert_within_twice_torch(out, expect, torch_out):
    """FlashAttention's rule: the kernel's error at most twice that of the same op in PyTorch in the same dtype."""
    assert not out.isnan().any()
    err = (out.cpu().double() - expect).abs().max().item()
    torch_err = (torch_out.cpu().double() - expect).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, f"kernel error {err:.3g}, PyTorch's {torch_err:.3g}"


# (B, S, Hq, Hkv, Dh, seq_lens): GQA 9 over 3, head dims 64, 72, 80 and 128 (padded to 128) and 8, lengths mid-block
# and on a block edge, seq_lens with one much shorter and one empty, 9 heads over 1.
SHAPES = [
    pytest.param(2, 37, 9, 3, 80, [37, 3], id="gqa9x3-d80-S37-short"),
    pytest.param(3, 32, 4, 2, 64, [32, 17, 0], id="gqa4x2-d64-S32-edge-empty"),
    pytest.param(1, 23, 3, 3, 72, None, id="mha3-d72-S23"),
    pytest.param(1, 20, 2, 1, 128, None, id="mqa2x1-d128-S20"),
    pytest.param(1, 24, 9, 1, 64, [21], id="mqa9x1-d64-S24"),  # a tile starts at token 14: 2 before a key block edge
    pytest.param(2, 19, 4, 2, 8, [11, 19], id="gqa4x2-d8-S19"),  # the tiny test models' head_dim, padded to 16
]


@pytest.mark.parametrize("B, S, Hq, Hkv, Dh, seq_lens", SHAPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("rope", [None, "full", "half"])
def test_matches_reference(B, S, Hq, Hkv, Dh, seq_lens, causal, rope):
    q, k, v = make_inputs(B, S, Hq, Hkv, Dh)
    kwargs = {"causal": causal}
    if rope:
        kwargs.update(rope_kwargs(B, S, Dh if rope == "full" else Dh // 2))
    if seq_lens is not None:
        kwargs["seq_lens"] = torch.tensor(seq_lens, dtype=torch.int32)
    assert_matches_fp32(run_kernel(q, k, v, **kwargs), reference_f64(q, k, v, **kwargs))


def test_strided_inputs_and_output():
    """q, k, v sliced out of one fused qkv projection, head-major storage for v, output into a wider buffer."""
    B, S, Hq, Hkv, Dh = 2, 29, 6, 2, 64
    qkv = torch.randn(B, S, Hq + 2 * Hkv, Dh)
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv]
    v = torch.randn(B, Hkv, S, Dh).transpose(1, 2)  # [B, S, Hkv, Dh] view of [B, Hkv, S, Dh] storage
    wide = torch.full((B, S, Hq, 2 * Dh), float("nan"))
    out = wide[..., :Dh]
    kwargs = {**rope_kwargs(B, S, Dh), "scale": 0.3, "seq_lens": torch.tensor([29, 11])}
    rope_attention(q, k, v, out=out, **kwargs)
    assert_matches_fp32(out, reference_f64(q, k, v, **kwargs))
    assert wide[..., Dh:].isnan().all()


def test_positions_int64_and_default_scale_match():
    B, S, Hq, Hkv, Dh = 1, 18, 3, 1, 80
    q, k, v = make_inputs(B, S, Hq, Hkv, Dh, seed=3)
    kwargs = rope_kwargs(B, S, 32)
    kwargs["positions"] = kwargs["positions"].long()
    assert_matches_fp32(run_kernel(q, k, v, **kwargs), reference_f64(q, k, v, **kwargs))


def patch_mask(grid, valid):
    """[B, H*W] bool: a top-left h x w block of an H x W patch grid, flattened row-major (the vision encoder's)."""
    H, W = grid
    mask = torch.zeros(len(valid), H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(valid):
        mask[b, :h, :w] = True
    return mask.flatten(1)


@pytest.mark.parametrize("Hq, Hkv, Dh", [(3, 3, 64), (4, 2, 80)])
def test_key_mask_vision_patches(Hq, Hkv, Dh):
    """Bidirectional attention over a 6 x 7 patch grid with padded patches: only the valid top-left region is
    attended; padded queries still attend to the valid keys (the reference's semantics)."""
    B, S = 3, 42
    q, k, v = make_inputs(B, S, Hq, Hkv, Dh, seed=5)
    key_mask = patch_mask((6, 7), [(4, 5), (6, 7), (1, 3)])
    kwargs = {"causal": False, "key_mask": key_mask}
    assert_matches_fp32(run_kernel(q, k, v, **kwargs), reference_f64(q, k, v, **kwargs))


def test_key_mask_with_rope_causal_and_seq_lens():
    B, S, Hq, Hkv, Dh = 2, 40, 9, 3, 64
    q, k, v = make_inputs(B, S, Hq, Hkv, Dh, seed=6)
    gen = torch.Generator().manual_seed(7)
    key_mask = torch.rand(B, S, generator=gen) < 0.7
    key_mask[:, 0] = True  # every causal row keeps a key, so the reference has no NaN
    kwargs = {**rope_kwargs(B, S, Dh // 2), "key_mask": key_mask, "seq_lens": torch.tensor([40, 26])}
    assert_matches_fp32(run_kernel(q, k, v, **kwargs), reference_f64(q, k, v, **kwargs))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_rows_without_any_key_are_zero(causal):
    """Where key_mask leaves a row no key, the kernel writes zeros (as SDPA does; a plain softmax gives NaN);
    the other rows match. Batch 0 has no valid key at all; in batch 1 the first 21 keys (more than a key block)
    are masked, so causal rows 0..20 see nothing and the later rows start from fully masked blocks."""
    B, S, Hq, Hkv, Dh = 2, 37, 9, 3, 80
    q, k, v = make_inputs(B, S, Hq, Hkv, Dh, seed=8)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[0] = False
    key_mask[1, :21] = False
    out = run_kernel(q, k, v, causal=causal, key_mask=key_mask)
    expect = reference_f64(q, k, v, causal=causal, key_mask=key_mask)
    empty = torch.zeros(B, S, dtype=torch.bool)
    empty[0] = True
    if causal:
        empty[1, :21] = True
    assert (out[empty] == 0).all()
    assert_matches_fp32(out[~empty], expect[~empty])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_in_interpreter(dtype):
    """fp16/bf16 loads, RoPE rounding and stores (the interpreter computes bf16 products in fp32)."""
    B, S, Hq, Hkv, Dh = 2, 37, 9, 3, 80
    q, k, v = make_inputs(B, S, Hq, Hkv, Dh, dtype=dtype, seed=9)
    kwargs = {**rope_kwargs(B, S, Dh), "seq_lens": torch.tensor([37, 20])}
    out = run_kernel(q, k, v, **kwargs)
    torch_out = reference.rope_attention(q, k, v, **kwargs)
    assert_within_twice_torch(out, reference_f64(q, k, v, **kwargs), torch_out)


def test_bad_inputs():
    q, k, v = make_inputs(1, 8, 4, 3, 64)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        rope_attention(q, k, v)
    q, k, v = make_inputs(1, 8, 4, 2, 64)
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_attention(q, k, v, **{**rope_kwargs(1, 8, 64), "rotary_dim": 63})
    with pytest.raises(ValueError, match="share one of"):
        rope_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="key_mask"):
        rope_attention(q, k, v, key_mask=torch.ones(1, 8))


# ---------------------------------------------------------------- GPU: the compiled kernel

@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("B, S, Hq, Hkv, Dh, seq_lens", [
    pytest.param(2, 1000, 9, 3, 64, [1000, 77], id="gqa9x3-d64-S1000"),
    pytest.param(1, 1025, 15, 5, 64, None, id="gqa15x5-d64-S1025"),
    pytest.param(2, 517, 4, 2, 80, [517, 128], id="gqa4x2-d80-S517"),
    pytest.param(1, 300, 12, 12, 72, None, id="mha12-d72-S300"),
    pytest.param(1, 256, 8, 2, 128, None, id="gqa8x2-d128-S256"),
])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("rope", [None, "full", "half"])
def test_gpu(dtype, B, S, Hq, Hkv, Dh, seq_lens, causal, rope):
    q, k, v = make_inputs(B, S, Hq, Hkv, Dh, dtype=dtype, device="cuda")
    kwargs = {"causal": causal}
    if rope:
        kwargs.update(rope_kwargs(B, S, Dh if rope == "full" else Dh // 2, device="cuda"))
    if seq_lens is not None:
        kwargs["seq_lens"] = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    check_gpu_case(q, k, v, kwargs, dtype)


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_vision_key_mask(dtype):
    """The vision encoder's case at SigLIP's size: 32 x 32 patches, 12 heads of 64, padded images."""
    B, S, H, Dh = 3, 1024, 12, 64
    q, k, v = make_inputs(B, S, H, H, Dh, dtype=dtype, device="cuda")
    kwargs = {"causal": False, "key_mask": patch_mask((32, 32), [(32, 32), (20, 27), (3, 5)]).cuda()}
    check_gpu_case(q, k, v, kwargs, dtype)
