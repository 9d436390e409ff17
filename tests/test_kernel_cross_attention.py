"""The Triton cross_attention kernel against the PyTorch reference in float64.

Without a GPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes, in fp32
within 1e-5 relative; the interpreter's key blocks are 16 image tokens, so T = 50 ends mid-block and 48 on an edge.
Every input is fresh random, the output starts as NaN, and the image K/V past each kv_len are NaN, so reading a
padded image token or leaving an output element unwritten fails.
"""
import pytest
import torch

from smolvlm_fast.kernels.cross_attention import cross_attention
from smolvlm_fast.ops import reference

from . import kernel_checks
from .kernel_checks import run_into_nan

GPU = pytest.mark.gpu


def make_inputs(B, S, T, Hq, Hkv, Dh, kv_lens, *, dtype=torch.float32, device="cpu", seed=0):
    """q [B, S, Hq, Dh], k, v [B, T, Hkv, Dh] with NaN past kv_lens[b], kv_lens int32 (or None)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, Dh, generator=gen)
    k, v = torch.randn(B, T, Hkv, Dh, generator=gen), torch.randn(B, T, Hkv, Dh, generator=gen)
    if kv_lens is not None:
        for b, n in enumerate(kv_lens):
            k[b, n:] = v[b, n:] = float("nan")
        kv_lens = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, kv_lens


def reference_f64(q, k, v, kv_lens=None, **kwargs):
    kv_lens = None if kv_lens is None else kv_lens.cpu()
    return reference.cross_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), kv_lens=kv_lens, **kwargs)


def run_kernel(q, k, v, **kwargs):
    return run_into_nan(cross_attention, q, q, k, v, **kwargs)


def assert_matches_fp32(out, expect):
    kernel_checks.assert_matches_fp32(out, expect, "unwritten, or a padded token was read")


# (B, S, T, Hq, Hkv, Dh, kv_lens): single-token decode and prefill; GQA 9 over 3 and 15 over 5; kv_lens full,
# mid-block, on a block edge and 0.
SHAPES = [
    pytest.param(3, 1, 50, 9, 3, 64, [50, 0, 17], id="decode-gqa9x3-d64-T50"),
    pytest.param(2, 1, 64, 15, 5, 80, [64, 48], id="decode-gqa15x5-d80-T64-edge"),
    pytest.param(2, 1, 37, 4, 4, 72, None, id="decode-mha4-d72-T37"),
    pytest.param(2, 13, 40, 9, 3, 80, [32, 7], id="prefill-gqa9x3-d80-S13"),
    pytest.param(1, 21, 33, 4, 2, 128, None, id="prefill-gqa4x2-d128-S21"),
    pytest.param(2, 6, 30, 2, 1, 64, [0, 30], id="prefill-mqa2x1-d64-empty"),
    pytest.param(2, 3, 20, 4, 2, 8, [20, 5], id="prefill-gqa4x2-d8"),
]


@pytest.mark.parametrize("B, S, T, Hq, Hkv, Dh, kv_lens", SHAPES)
def test_matches_reference(B, S, T, Hq, Hkv, Dh, kv_lens):
    q, k, v, kv_lens = make_inputs(B, S, T, Hq, Hkv, Dh, kv_lens)
    out = run_kernel(q, k, v, kv_lens=kv_lens)
    assert_matches_fp32(out, reference_f64(q, k, v, kv_lens))
    if kv_lens is not None:
        assert (out[kv_lens == 0] == 0).all()


def test_strided_inputs_and_scale():
    """k and v as halves of one [B, T, 2, Hkv, Dh] projection, q in head-major storage."""
    B, S, T, Hq, Hkv, Dh = 2, 5, 27, 6, 2, 64
    kv = torch.randn(B, T, 2, Hkv, Dh)
    k, v = kv[:, :, 0], kv[:, :, 1]
    q = torch.randn(B, Hq, S, Dh).transpose(1, 2)
    kv_lens = torch.tensor([27, 9])
    out = run_kernel(q, k, v, kv_lens=kv_lens, scale=0.2)
    assert_matches_fp32(out, reference_f64(q, k, v, kv_lens, scale=0.2))


def test_no_image_tokens():
    q, k, v, _ = make_inputs(2, 3, 0, 4, 2, 64, None)
    assert (run_kernel(q, k, v) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_in_interpreter(dtype):
    q, k, v, kv_lens = make_inputs(2, 1, 50, 9, 3, 80, [50, 21], dtype=dtype, seed=4)
    out = run_kernel(q, k, v, kv_lens=kv_lens)
    expect = reference_f64(q, k, v, kv_lens)
    err = (out.double() - expect).abs().max().item()
    torch_err = (reference.cross_attention(q, k, v, kv_lens=kv_lens).double() - expect).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, f"kernel error {err:.3g}, PyTorch's {torch_err:.3g}"


def test_bad_inputs():
    q, k, v, _ = make_inputs(2, 1, 10, 4, 2, 64, None)
    with pytest.raises(ValueError, match="kv_lens"):
        cross_attention(q, k, v, kv_lens=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="do not match"):
        cross_attention(q, k[:1], v[:1])


# ---------------------------------------------------------------- GPU: the compiled kernel

@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("B, S, T, Hq, Hkv, Dh, kv_lens", [
    pytest.param(4, 1, 1053, 9, 3, 64, [1053, 0, 81, 700], id="decode-gqa9x3-d64-T1053"),
    pytest.param(2, 1, 196, 15, 5, 80, [196, 128], id="decode-gqa15x5-d80-T196"),
    pytest.param(2, 300, 576, 9, 3, 64, [576, 200], id="prefill-gqa9x3-d64-S300"),
    pytest.param(1, 77, 256, 32, 8, 128, None, id="prefill-gqa32x8-d128-S77"),
])
def test_gpu(dtype, B, S, T, Hq, Hkv, Dh, kv_lens):
    q, k, v, kv_lens = make_inputs(B, S, T, Hq, Hkv, Dh, kv_lens, dtype=dtype, device="cuda")
    out = run_kernel(q, k, v, kv_lens=kv_lens)
    expect = reference_f64(q, k, v, kv_lens)
    if dtype == torch.float32:
        assert_matches_fp32(out, expect)
    else:
        assert not out.isnan().any()
        err = (out.cpu().double() - expect).abs().max().item()
        torch_err = (reference.cross_attention(q, k, v, kv_lens=kv_lens).cpu().double() - expect).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"kernel error {err:.3g}, PyTorch's {torch_err:.3g}"
