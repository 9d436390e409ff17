"""The Triton patch_embed and dwsep_patch_embed kernels against conv2d (the PyTorch reference) in float64.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small images, in fp32
within 1e-5 relative. The interpreter's tiles are 16 patches x 16 outputs with K tiles of 4 pixel rows, so every
case below ends a patch tile and an output tile midway (40 outputs, 30 patches, ...), and P = 14 leaves the last
K tile of each group half empty. fp16/bf16 follow FlashAttention's rule (error at most twice PyTorch's in the same
dtype). Every input is fresh random; outputs start as NaN (given as `out`, or allocated by the kernel through a
NaN-filling torch.empty), so an element never written fails. The `gpu` cases run the compiled kernels at
SigLIP's sizes and skip without CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

from smolvlm_fast import ops
from smolvlm_fast.kernels.patch_embed import dwsep_patch_embed, patch_embed
from smolvlm_fast.models.smolvlm_torch import bucketed_position_ids
from smolvlm_fast.ops import reference

from .kernel_checks import assert_matches_fp32, poison_allocations, run_into_nan  # noqa: F401  (autouse)

GPU = pytest.mark.gpu


def randn(*shape, gen, scale=1.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def bucketed_ids(B, rows, cols, side, gen, device="cpu"):
    """[B, rows·cols] int64: the position ids of B variable-size images padded to rows x cols patches (a random
    top-left rectangle of real patches each, the first image whole), as the vision encoder computes them."""
    mask = torch.zeros(B, rows, cols, dtype=torch.bool)
    for b in range(B):
        h = rows if b == 0 else int(torch.randint(1, rows + 1, (1,), generator=gen))
        w = cols if b == 0 else int(torch.randint(1, cols + 1, (1,), generator=gen))
        mask[b, :h, :w] = True
    return bucketed_position_ids(mask, side).to(device)


def position_inputs(B, rows, cols, D, positions, gen, *, side=5, dtype=torch.float32, device="cpu"):
    """(pos_embed, position_ids): "bucketed" looks a side x side learned grid up by bucketed coordinates,
    "arange" has position_ids None (a table a little longer than the image), "none" no pos_embed at all."""
    if positions == "bucketed":
        return (randn(side * side, D, gen=gen, dtype=dtype, device=device),
                bucketed_ids(B, rows, cols, side, gen, device))
    if positions == "arange":
        return randn(rows * cols + 3, D, gen=gen, dtype=dtype, device=device), None
    return None, None


def conv_inputs(B, C, H, W, P, D, groups, *, positions="bucketed", bias=True, dtype=torch.float32, device="cpu",
                seed=0, side=5):
    """(pixels, weight, bias, pos_embed, position_ids) for patch_embed."""
    gen = torch.Generator().manual_seed(seed)
    pixels = randn(B, C, H, W, gen=gen, dtype=dtype, device=device)
    weight = randn(D, C // groups, P, P, gen=gen, scale=(C // groups * P * P) ** -0.5, dtype=dtype, device=device)
    b = randn(D, gen=gen, dtype=dtype, device=device) if bias else None
    return (pixels, weight, b,
            *position_inputs(B, H // P, W // P, D, positions, gen, side=side, dtype=dtype, device=device))


def dwsep_inputs(B, C, H, W, P, D, *, positions="bucketed", bias=True, dtype=torch.float32, device="cpu", seed=0):
    """(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids) for dwsep_patch_embed."""
    gen = torch.Generator().manual_seed(seed)
    pixels = randn(B, C, H, W, gen=gen, dtype=dtype, device=device)
    dw_weight = randn(C, 1, P, P, gen=gen, scale=1 / P, dtype=dtype, device=device)
    pw_weight = randn(D, C, gen=gen, scale=C**-0.5, dtype=dtype, device=device)
    dw_bias = randn(C, gen=gen, dtype=dtype, device=device) if bias else None
    pw_bias = randn(D, gen=gen, dtype=dtype, device=device) if bias else None
    return (pixels, dw_weight, dw_bias, pw_weight, pw_bias,
            *position_inputs(B, H // P, W // P, D, positions, gen, dtype=dtype, device=device))


def f64(args):
    return [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]


def conv_expect(pixels, weight, bias, pos_embed, ids, groups=1):
    """conv2d + flatten + transpose + position add, written out, in float64."""
    pixels, weight, bias, pos_embed = f64([pixels, weight, bias, pos_embed])
    x = F.conv2d(pixels, weight, bias, stride=weight.shape[-1], groups=groups).flatten(2).transpose(1, 2)
    if pos_embed is None:
        return x
    return x + pos_embed[torch.arange(x.shape[1], device=x.device) if ids is None else ids]


def dwsep_expect(*args):
    return reference.dwsep_patch_embed(*f64(args))


# (B, C, H, W, P, D, groups): patch 16 and 14, images that are no multiple of the 16-patch tile, non-square,
# outputs ending mid-tile, groups 1, 2 and 3 (narrow groups of 10 and 8 outputs), and a SmolVLM-256M image after
# splitting: 12 tiles + the global image = 13 images (small ones here).
CONV_SHAPES = [
    pytest.param(2, 3, 32, 48, 16, 40, 1, id="p16-32x48-d40"),
    pytest.param(2, 3, 42, 70, 14, 24, 1, id="p14-42x70-d24"),
    pytest.param(2, 4, 48, 32, 16, 20, 2, id="p16-groups2-d20"),
    pytest.param(1, 3, 28, 56, 14, 24, 3, id="p14-groups3-d24"),
    pytest.param(13, 3, 32, 32, 16, 24, 1, id="p16-13-tiles"),
]


@pytest.mark.parametrize("B, C, H, W, P, D, groups", CONV_SHAPES)
@pytest.mark.parametrize("positions", ["bucketed", "arange"])
def test_patch_embed_matches_conv(B, C, H, W, P, D, groups, positions):
    args = conv_inputs(B, C, H, W, P, D, groups, positions=positions, seed=B + H + D)
    out = run_into_nan(patch_embed, torch.empty(B, (H // P) * (W // P), D), *args, groups=groups)
    assert_matches_fp32(out, conv_expect(*args, groups=groups))


@pytest.mark.parametrize("positions", ["bucketed", "none"])
def test_patch_embed_without_bias_allocates_output(positions):
    """bias None (and pos_embed None); the output allocated by the kernel (NaN-poisoned), equal to the reference."""
    args = conv_inputs(3, 3, 48, 32, 16, 24, 1, positions=positions, bias=False, seed=5)
    out = patch_embed(*args)
    assert out.shape == (3, 6, 24) and out.dtype == torch.float32
    expect = conv_expect(*args)
    assert_matches_fp32(out, expect)
    assert_matches_fp32(ops.patch_embed(*args, impl="reference"), expect)


def test_patch_embed_ignores_pixels_past_the_last_patch():
    """As conv2d (and SigLIP at 384 px with patch 14: 27 patches, 6 px left over): the remainder is not read."""
    pixels, weight, bias, pos_embed, _ = conv_inputs(2, 3, 38, 50, 14, 24, 1, positions="arange", seed=6)
    pixels[:, :, 28:] = float("nan")
    pixels[:, :, :, 42:] = float("nan")
    out = patch_embed(pixels, weight, bias, pos_embed, None)
    assert out.shape == (2, 6, 24)
    assert_matches_fp32(out, conv_expect(pixels[:, :, :28, :42], weight, bias, pos_embed, None))


def test_patch_embed_strided_inputs():
    """Channels-last pixels cropped out of a larger image, a transposed weight view, int32 ids of shape [N]
    broadcast over the batch, and an output that is a slice of a wider buffer."""
    gen = torch.Generator().manual_seed(7)
    big = randn(2, 40, 70, 3, gen=gen).permute(0, 3, 1, 2)  # [2, 3, 40, 70], channels last
    pixels = big[:, :, 3:35, 5:53]  # [2, 3, 32, 48]
    weight = randn(16, 16, 3, 40, gen=gen, scale=0.05).permute(3, 2, 0, 1)  # [40, 3, 16, 16], not contiguous
    bias, pos_embed = randn(40, gen=gen), randn(9, 40, gen=gen)
    ids = torch.randint(0, 9, (6,), generator=gen, dtype=torch.int32)
    wide = torch.full((2, 6, 50), float("nan"))
    out = patch_embed(pixels, weight, bias, pos_embed, ids, out=wide[:, :, 4:44])
    assert_matches_fp32(out, conv_expect(pixels, weight, bias, pos_embed, ids.long()))
    assert wide[:, :, :4].isnan().all() and wide[:, :, 44:].isnan().all()


# (B, C, H, W, P, D): RGB at patch 16 and 14, outputs over three 16-wide tiles (the interpreter runs two programs
# per patch tile: one walks tiles 0 and 2), 13 images, 20 channels (one channel block of 32) and 70 channels
# (more than one program holds: the chunked path, at patch 4 to keep the interpreter quick).
DWSEP_SHAPES = [
    pytest.param(2, 3, 32, 48, 16, 40, id="p16-rgb-d40"),
    pytest.param(2, 3, 42, 70, 14, 24, id="p14-rgb-d24"),
    pytest.param(13, 3, 32, 32, 16, 24, id="p16-13-tiles"),
    pytest.param(1, 20, 28, 42, 14, 36, id="p14-c20-d36"),
    pytest.param(2, 70, 8, 12, 4, 24, id="p4-c70-chunked"),
]


@pytest.mark.parametrize("B, C, H, W, P, D", DWSEP_SHAPES)
@pytest.mark.parametrize("positions, bias", [("bucketed", True), ("arange", False)])
def test_dwsep_matches_reference(B, C, H, W, P, D, positions, bias):
    args = dwsep_inputs(B, C, H, W, P, D, positions=positions, bias=bias, seed=B + C + D)
    out = run_into_nan(dwsep_patch_embed, torch.empty(B, (H // P) * (W // P), D), *args)
    expect = dwsep_expect(*args)
    assert_matches_fp32(out, expect)
    pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, ids = f64(args)  # the same, as two convs
    two_convs = conv_expect(conv_expect(pixels, dw_weight, dw_bias, None, None, groups=C).transpose(1, 2)
                            .reshape(B, C, H // P, W // P), pw_weight[:, :, None, None], pw_bias, pos_embed, ids)
    torch.testing.assert_close(expect, two_convs)


def test_dwsep_without_positions():
    args = dwsep_inputs(2, 3, 32, 32, 16, 24, positions="none", seed=8)
    out = dwsep_patch_embed(*args)
    assert_matches_fp32(out, dwsep_expect(*args))


# ---------------------------------------------------------------- low precision

def truncation_slack(op, args, expect):
    """Triton's interpreter casts fp32 -> bf16 by truncation where GPUs round to nearest: one bf16 ulp of each
    output, and for dwsep also one ulp of each depthwise value carried through the pointwise projection."""
    eps = torch.finfo(torch.bfloat16).eps
    slack = eps * expect.abs()
    if op == "dwsep":
        pixels, dw_weight, dw_bias, pw_weight = f64(args[:4])
        dw = conv_expect(pixels, dw_weight, dw_bias, None, None, groups=pixels.shape[1])  # [B, N, C]
        slack = slack + eps * dw.abs() @ pw_weight.abs().T
    return slack


def assert_within_twice_torch(out, expect, torch_out, slack=None):
    """FlashAttention's rule: the kernel's error at most twice that of the same op in PyTorch in the same dtype."""
    assert out.dtype == torch_out.dtype and not out.isnan().any()
    err = (out.cpu().double() - expect.cpu()).abs()
    if slack is not None:
        err = (err - slack.cpu()).clamp(min=0)
    torch_err = (torch_out.cpu().double() - expect.cpu()).abs().max().item()
    assert err.max().item() <= 2 * torch_err, f"kernel error {err.max().item():.3g}, PyTorch's {torch_err:.3g}"


@pytest.mark.parametrize("op", ["conv", "dwsep"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_in_interpreter(op, dtype):
    """fp16/bf16 loads, the depthwise rounding and the stores (the interpreter computes the products in fp32)."""
    if op == "conv":
        args = conv_inputs(2, 3, 32, 48, 16, 40, 1, dtype=dtype, seed=9)
        out, plain, expect = patch_embed(*args), reference.patch_embed(*args), conv_expect(*args)
    else:
        args = dwsep_inputs(2, 3, 32, 48, 16, 40, dtype=dtype, seed=9)
        out, plain, expect = dwsep_patch_embed(*args), reference.dwsep_patch_embed(*args), dwsep_expect(*args)
    slack = truncation_slack(op, args, expect) if dtype == torch.bfloat16 else None
    assert_within_twice_torch(out, expect, plain, slack)


def test_output_dtype_follows_the_reference():
    """fp16 pixels with an fp32 position table give fp32, as the reference's conv output + pos_embed does."""
    pixels, weight, bias, pos_embed, ids = conv_inputs(1, 3, 32, 32, 16, 24, 1, dtype=torch.float16, seed=10)
    out = patch_embed(pixels, weight, bias, pos_embed.float(), ids)
    assert out.dtype == reference.patch_embed(pixels, weight, bias, pos_embed.float(), ids).dtype == torch.float32
    assert not out.isnan().any()


# ---------------------------------------------------------------- dispatch and errors

def test_ops_dispatch_to_the_kernels():
    assert "triton" in ops.available("patch_embed") and "triton" in ops.available("dwsep_patch_embed")
    args = conv_inputs(2, 3, 32, 32, 16, 24, 3, seed=11)
    assert_matches_fp32(ops.patch_embed(*args, groups=3, impl="triton"), conv_expect(*args, groups=3))
    args = dwsep_inputs(1, 3, 32, 32, 16, 24, seed=12)
    with ops.prefer("triton"):
        assert_matches_fp32(ops.dwsep_patch_embed(*args), dwsep_expect(*args))


def test_bad_inputs():
    pixels, weight, bias, pos_embed, ids = conv_inputs(2, 3, 32, 32, 16, 24, 1, seed=13)
    with pytest.raises(ValueError, match="groups"):
        patch_embed(pixels, weight, bias, pos_embed, ids, groups=3)
    with pytest.raises(ValueError, match=r"\[D, C/groups, P, P\]"):
        patch_embed(pixels, weight[..., :8], bias, pos_embed, ids)
    with pytest.raises(ValueError, match="like the pixels"):
        patch_embed(pixels, weight.half(), bias, pos_embed, ids)
    with pytest.raises(ValueError, match="bias"):
        patch_embed(pixels, weight, bias[:5], pos_embed, ids)
    with pytest.raises(ValueError, match="position_ids"):
        patch_embed(pixels, weight, bias, pos_embed, ids[:, :3])
    with pytest.raises(ValueError, match="int32 or int64"):
        patch_embed(pixels, weight, bias, pos_embed, ids.float())
    with pytest.raises(ValueError, match="only 2 positions"):
        patch_embed(pixels, weight, bias, pos_embed[:2], None)
    with pytest.raises(ValueError, match="out must be"):
        patch_embed(pixels, weight, bias, pos_embed, ids, out=torch.empty(2, 4, 25))
    args = list(dwsep_inputs(1, 3, 32, 32, 16, 24, seed=14))
    with pytest.raises(ValueError, match="channels"):
        dwsep_patch_embed(args[0][:, :2], *args[1:])
    with pytest.raises(ValueError, match=r"\[C, 1, P, P\]"):
        dwsep_patch_embed(args[0], args[1].transpose(0, 1), *args[2:])


# ---------------------------------------------------------------- GPU: the compiled kernels at SigLIP's sizes

def check_gpu(op, args, dtype, groups=1):
    """fp32 within 1e-5 of the float64 reference (the kernel's fp32 products are IEEE, not TF32); fp16 / bf16
    within twice the error of the reference run in the same dtype on the same GPU."""
    if op == "conv":
        out = patch_embed(*args, groups=groups)
        expect, plain = conv_expect(*args, groups=groups), reference.patch_embed(*args, groups=groups)
    else:
        out, expect, plain = dwsep_patch_embed(*args), dwsep_expect(*args), reference.dwsep_patch_embed(*args)
    torch.cuda.synchronize()
    if dtype == torch.float32:
        assert_matches_fp32(out, expect.cpu())
    else:
        assert_within_twice_torch(out, expect, plain)


GPU_DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                                     ids=["bf16", "fp16", "fp32"])


@GPU
@GPU_DTYPES
@pytest.mark.parametrize("B, H, W, P, D", [
    pytest.param(13, 512, 512, 16, 768, id="smolvlm-256m-13-tiles"),
    pytest.param(3, 384, 384, 14, 1152, id="smolvlm-2.2b-384"),
    pytest.param(2, 224, 336, 16, 768, id="p16-224x336"),
])
def test_gpu_patch_embed(dtype, B, H, W, P, D):
    args = conv_inputs(B, 3, H, W, P, D, 1, dtype=dtype, device="cuda", side=max(H, W) // P)
    check_gpu("conv", args, dtype)


@GPU
@GPU_DTYPES
@pytest.mark.parametrize("groups", [3, 2])
def test_gpu_grouped(dtype, groups):
    C = 6 if groups == 2 else 3
    args = conv_inputs(5, C, 224, 224, 16, 384, groups, positions="arange", dtype=dtype, device="cuda")
    check_gpu("conv", args, dtype, groups=groups)


@GPU
@GPU_DTYPES
@pytest.mark.parametrize("B, C, H, W, P, D", [
    pytest.param(8, 3, 224, 224, 16, 384, id="vit-lite-224"),
    pytest.param(13, 3, 512, 512, 16, 768, id="13-tiles"),
    pytest.param(2, 96, 224, 224, 14, 256, id="c96-chunked"),
])
def test_gpu_dwsep(dtype, B, C, H, W, P, D):
    check_gpu("dwsep", dwsep_inputs(B, C, H, W, P, D, dtype=dtype, device="cuda"), dtype)
