"""Triton small ops (rms_norm, layer_norm, silu_and_mul, gelu_tanh) against the PyTorch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1);
the `gpu` cases run the compiled kernels on CUDA and skip elsewhere. Tolerances (smolvlm_fast/ops/README.md):
- fp32: within 1e-5 relative of the reference run in fp32;
- fp16 / bf16: error against the reference run in fp64 at most twice that of the plain PyTorch op run in the
  same precision (FlashAttention's rule), see `assert_error_within`.
Inputs are fresh random tensors. The kernels allocate their outputs with torch.empty, which the autouse fixture
`poison_allocations` makes NaN-filled here, so an element a kernel never writes fails the all-finite check.
"""
from __future__ import annotations

import os

import pytest
import torch

from smolvlm_fast.ops import reference

from .kernel_checks import poison_allocations  # noqa: F401  (autouse)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (device, dtype): the CPU ones need the interpreter, the CUDA ones a GPU (marker `gpu`, skipped elsewhere).
DEVICE_DTYPES = [
    *(pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}",
                   marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1"))
      for dt in FLOAT_DTYPES),
    *(pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.gpu) for dt in FLOAT_DTYPES),
]


def truncating_bf16(t: torch.Tensor) -> bool:
    """Triton's interpreter casts fp32 -> bf16 by truncation (round toward zero), where GPUs round to nearest."""
    return INTERPRET and t.dtype == torch.bfloat16


def assert_error_within(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, factor: float = 2.0) -> None:
    """FlashAttention's rule: max |out - ref64| <= factor * max |plain - ref64|, where ref64 is the reference in
    fp64 and plain the plain PyTorch op run in out's precision on the same device.

    bf16 on the interpreter: plus one bf16 ulp of each element, the most its truncating cast adds."""
    assert out.dtype == plain.dtype and out.shape == ref64.shape
    err = (out.double() - ref64).abs()
    err_plain = (plain.double() - ref64).abs().max().item()
    slack = torch.zeros_like(ref64)
    if truncating_bf16(out):
        slack = torch.finfo(torch.bfloat16).eps * ref64.abs()
    worst = (err - slack).max().item()
    assert worst <= factor * err_plain, (
        f"{out.dtype}: max error {err.max().item():.3g} (less interpreter slack: {worst:.3g}) > "
        f"{factor} x PyTorch's {err_plain:.3g}")


def assert_same_rounding(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal, but for the interpreter's truncating bf16 cast (then within one bf16 ulp)."""
    if truncating_bf16(out):
        ulp = torch.finfo(torch.bfloat16).eps * expected.double().abs()
        assert ((out.double() - expected.double()).abs() <= ulp).all()
    else:
        assert torch.equal(out, expected)


def check(out, ref_fn, *inputs):
    """out from the kernel; ref_fn the reference op; inputs the tensors it was computed from (others via closure)."""
    assert torch.isfinite(out).all(), "the kernel left unwritten (NaN) or non-finite elements"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref_fn(*inputs), rtol=1e-5, atol=1e-6)
    else:
        ref64 = ref_fn(*(t.double() if t.is_floating_point() else t for t in inputs))
        assert_error_within(out, ref64, ref_fn(*inputs))


def randn(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


# ---------------------------------------------------------------- rms_norm

@pytest.mark.parametrize("shape", [(7, 576), (2, 3, 80), (4, 1), (3, 960)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_rms_norm(shape, with_residual, device, dtype):
    from smolvlm_fast.kernels.rms_norm import rms_norm

    x, weight = randn(*shape, dtype=dtype, device=device), randn(shape[-1], dtype=dtype, device=device)
    eps = 1e-5
    if not with_residual:
        check(rms_norm(x, weight, eps), lambda x, w: reference.rms_norm(x, w, eps), x, weight)
        return
    residual = randn(*shape, dtype=dtype, device=device)
    y, summed = rms_norm(x, weight, eps, residual=residual)
    assert summed.dtype == x.dtype
    assert_same_rounding(summed, x + residual)  # the sum is rounded to x's dtype exactly as torch's add
    check(y, lambda x, w, r: reference.rms_norm(x, w, eps, r)[0], x, weight, residual)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES[:1] + DEVICE_DTYPES[3:4])
def test_rms_norm_strided_rows(device, dtype):
    """Rows that are a slice of a wider tensor (a fused projection's output) are read in place."""
    from smolvlm_fast.kernels.rms_norm import rms_norm

    wide = randn(5, 700, dtype=dtype, device=device)
    x, weight = wide[:, 64:640], randn(576, dtype=dtype, device=device)
    check(rms_norm(x, weight, 1e-6), lambda x, w: reference.rms_norm(x, w, 1e-6), x, weight)


@pytest.mark.parametrize("device, dtype", [DEVICE_DTYPES[1], *DEVICE_DTYPES[4:]])
def test_rms_norm_rounds_where_the_reference_rounds(device, dtype):
    """Low precision: the normalized value is rounded to x's dtype before the weight product, as in the reference
    (and transformers), so nearly all elements agree bit for bit (fp32 sums in another order may flip a few)."""
    from smolvlm_fast.kernels.rms_norm import rms_norm

    x, weight = randn(16, 576, dtype=dtype, device=device), randn(576, dtype=dtype, device=device)
    same = rms_norm(x, weight, 1e-5) == reference.rms_norm(x, weight, 1e-5)
    assert same.double().mean().item() > 0.99


# ---------------------------------------------------------------- layer_norm

@pytest.mark.parametrize("shape", [(7, 768), (2, 3, 80), (4, 1), (3, 576)], ids=str)
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_layer_norm(shape, affine, device, dtype):
    from smolvlm_fast.kernels.layer_norm import layer_norm

    x = randn(*shape, dtype=dtype, device=device, scale=3.0) + 0.5  # a non-zero mean
    weight = randn(shape[-1], dtype=dtype, device=device) if affine != "none" else None
    bias = randn(shape[-1], dtype=dtype, device=device) if affine == "weight_bias" else None
    eps = 1e-6
    params = [p for p in (weight, bias) if p is not None]

    def ref(x, *p):
        return reference.layer_norm(x, p[0] if weight is not None else None, p[1] if bias is not None else None, eps)

    check(layer_norm(x, weight, bias, eps), ref, x, *params)


# ---------------------------------------------------------------- activations

@pytest.mark.parametrize("shape", [(5, 2 * 80), (2, 3, 2 * 1536), (3, 2 * 1), (1, 2 * 577)], ids=str)
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_silu_and_mul(shape, device, dtype):
    from smolvlm_fast.kernels.activations import silu_and_mul

    x = randn(*shape, dtype=dtype, device=device, scale=2.0)
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    check(out, reference.silu_and_mul, x)


@pytest.mark.parametrize("shape", [(7, 768), (2, 3, 80), (3, 5, 1), (1, 3072)], ids=str)
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_gelu_tanh(shape, device, dtype):
    from smolvlm_fast.kernels.activations import gelu_tanh

    x = randn(*shape, dtype=dtype, device=device, scale=2.0)
    check(gelu_tanh(x), reference.gelu_tanh, x)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES[:1] + DEVICE_DTYPES[3:4])
def test_activations_strided_and_large_inputs(device, dtype):
    """Non-contiguous inputs, and |x| up to 1e4 (exp overflows to inf: the result must stay finite, not NaN)."""
    from smolvlm_fast.kernels.activations import gelu_tanh, silu_and_mul

    x = randn(2 * 80, 6, dtype=dtype, device=device, scale=30.0)
    x[0, :3] = torch.tensor([1e4, -1e4, -90.0])
    check(gelu_tanh(x.t()), reference.gelu_tanh, x.t())
    check(silu_and_mul(x.t()), reference.silu_and_mul, x.t())
    wide = randn(4, 2 * 96 + 32, dtype=dtype, device=device)[:, 32:]  # rows with a stride of 224
    check(silu_and_mul(wide), reference.silu_and_mul, wide)


def test_bad_shapes_raise():
    from smolvlm_fast.kernels.activations import silu_and_mul
    from smolvlm_fast.kernels.rms_norm import rms_norm

    with pytest.raises(ValueError, match="not even"):
        silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(torch.randn(2, 8), torch.randn(9), 1e-6)
