"""The vision encoder fused in C++ with bf16 products (csrc/cpu/vision_encoder.cpp, vision_attention.cpp;
smolvlm_fast._cpu.VisionEncoder, vision_attention; cpu/vision.py) against float64 references of the same
arithmetic (tests/vision_bf16_reference.py) and against the float32 NumPy encoder. (The bf16 products alone:
test_cpu_bf16_gemm.py; the encoder against transformers: test_cpu_vision_encoder.py, test_bf16_weights.py.)

Two layers of checks:
- the parts, with bounds derived from the float32 sums: the attention (q/k/v rounded from the same float32 inputs; the
  probabilities are the kernel's own float32 values, so the bound counts one bf16 step for each probability whose
  float32 error can reach a rounding midpoint, and nothing else). These catch a missing or misplaced rounding.
- the whole encoder, where the kernel's LN outputs, q/k/v, attention outputs and GELU outputs are its own float32
  values before rounding, so a few roundings land on the other bf16 neighbour of the reference's and propagate
  (through attention, one flipped key moves every query of its tile). No bound on the sums alone holds there;
  instead a second reference rounds the other way every value whose likely float32 error (3 sqrt(n) u32, Higham
  and Mary's probabilistic bound for an n-term sum) reaches a rounding midpoint: the kernel flips a subset of
  those, so it is no further (RMS) from the same-arithmetic reference than this flip-everything one. (Measured on
  150 draws of the shapes below: at most half as far.) That catches a wrong weight, bias, norm, mask or residual;
  the roundings themselves are the parts' checks.
  And against the float32 NumPy encoder: ours is no further from it than 2x the same-arithmetic reference is.

The attention runs on each kernel this CPU can run (_cpu.vision_attention's isa): AMX tiles, the same AMX loop
with each tile instruction emulated in software (any CPU: how CI without AMX tests the AMX layouts), AVX512-BF16
and float32 FMAs, all under the same bounds. They differ only in float32 summation order (the AMX hardware's
TDPBF16PS does not add its products one at a time as the emulator does), so on inputs where every sum is exact
they agree bit for bit.

Fresh random inputs every test (the per-test seed), NaN-poisoned outputs where the op writes a fresh array."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from smolvlm_fast.config import VisionConfig
from smolvlm_fast.cpu import ops as numpy_ops
from smolvlm_fast.cpu import vision as cpu_vision
from smolvlm_fast.cpu.native import _cpu
from smolvlm_fast.errors import InputError
from smolvlm_fast.models import vision_numpy
from tests import vision_bf16_reference as ref

pytestmark = pytest.mark.skipif(not cpu_vision.available(), reason="the C++ vision encoder is not built")
RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)
ISAS = ["f32", "avx512bf16", "amx-emulated", "amx"]  # the attention kernels (csrc/cpu/vision_attention.h)


def runnable(isa: str) -> bool:
    return _cpu is not None and hasattr(_cpu, "vision_attention_runnable") and _cpu.vision_attention_runnable(isa)


KERNELS = [pytest.param(isa, marks=pytest.mark.skipif(not runnable(isa), reason=f"this CPU (or build, or OS) "
                                                      f"cannot run the {isa} attention kernel")) for isa in ISAS]
EPS = 1e-6


def key_mask(B: int, S: int, kind: str) -> np.ndarray | None:
    """None ("none"), or [B, S] bool with random padding ("pad"); the last tile keeps one real patch ("one")."""
    if kind == "none":
        return None
    mask = RNG.random((B, S)) < 0.7
    mask[np.arange(B), RNG.integers(0, S, B)] = True  # every tile keeps a real patch
    if kind == "one":
        mask[-1] = False
        mask[-1, RNG.integers(0, S)] = True
    return mask


def scale_of(Dh: int) -> float:
    return float(np.float32(1) / np.sqrt(np.float32(Dh)))  # the kernel's float32 scale


# ---------------------------------------------------------------- the attention alone

ATTENTION_SHAPES = [(1, 1, 2, 32), (2, 3, 2, 64), (3, 17, 4, 32), (2, 33, 3, 64), (1, 64, 3, 64), (2, 100, 2, 32),
                    (3, 100, 4, 24), (2, 130, 2, 64)]
# (B, S, H, Dh): S across key blocks of 64, query groups of 6 and AMX items of 32, paddings to 32; Dh 24 padded


@pytest.mark.parametrize("B,S,H,Dh", ATTENTION_SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "pad", "one"])
@pytest.mark.parametrize("isa", KERNELS)
def test_attention_matches_float64(B, S, H, Dh, mask_kind, isa):
    qkv = (RNG.standard_normal((B * S, 3 * H * Dh)) * RNG.choice([0.5, 2.0])).astype(np.float32)
    mask = key_mask(B, S, mask_kind)
    out = np.full((B * S, H * Dh), np.nan, np.float32)
    _cpu.vision_attention(qkv, B, S, H, mask, out, isa)
    expect, bound = ref.attention(qkv.astype(np.float64), B, S, H, mask, scale_of(Dh))
    assert np.isfinite(out).all()
    assert (np.abs(out - expect) <= bound).all(), float((np.abs(out - expect) / bound).max())


@pytest.mark.parametrize("isa", KERNELS)
def test_attention_masked_keys_are_ignored(isa):
    """Changing masked keys' k and v changes nothing (padding patches' own rows are still computed)."""
    B, S, H, Dh = 2, 40, 2, 32
    qkv = RNG.standard_normal((B * S, 3 * H * Dh), dtype=np.float32)
    mask = key_mask(B, S, "pad")
    out, other = (np.full((B * S, H * Dh), np.nan, np.float32) for _ in range(2))
    _cpu.vision_attention(qkv, B, S, H, mask, out, isa)
    changed = qkv.copy()
    changed[~mask.reshape(-1), H * Dh:] = 1e3  # masked rows' k and v
    _cpu.vision_attention(changed, B, S, H, mask, other, isa)
    np.testing.assert_array_equal(out, other)


def exact_qkv(B: int, S: int, H: int, Dh: int) -> np.ndarray:
    """qkv [B * S, 3 H Dh] on which every kernel's sums are exact in float32, whatever their order.

    q . k is a small integer: q has feature 0 = 1 and three more of +-1, k's entries are in {-1, 0, 1} except that
    key 0 of each tile is 4 at feature 0 and 0 elsewhere. So key 0 (in the first key block, kept by the masks) has
    every query's largest score, 4 scale against at most 3 scale for the rest: the running max is set once, and
    every later rescaling is by exactly 1. Then p = bf16(exp(s - m)) >= e^(-7 scale) > 1/8 (scale <= 1 / sqrt(24))
    is a multiple of 2^-10, v is an integer in [-2, 2], so each partial sum of p v or p (|.| <= 2 S <= 2^11 for
    S <= 1024) needs at most 22 bits."""
    q = np.zeros((B, S, H, Dh))
    q[..., 0] = 1
    for idx in np.ndindex(B, S, H):
        q[idx][1 + RNG.choice(Dh - 1, min(3, Dh - 1), replace=False)] = RNG.choice([-1, 1], min(3, Dh - 1))
    k = RNG.integers(-1, 2, (B, S, H, Dh)).astype(np.float64)
    k[..., 0] = 0
    k[:, 0] = 0
    k[:, 0, :, 0] = 4
    v = RNG.integers(-2, 3, (B, S, H, Dh)).astype(np.float64)
    return np.concatenate([a.reshape(B * S, H * Dh) for a in (q, k, v)], axis=1).astype(np.float32)


@pytest.mark.parametrize("B,S,H,Dh", [(1, 1, 2, 64), (2, 17, 2, 64), (3, 33, 2, 32), (1, 100, 3, 64), (2, 200, 2, 24),
                                     (1, 1024, 2, 64)])
def test_attention_kernels_agree_where_sums_are_exact(B, S, H, Dh):
    """With every sum exact (exact_qkv), the summation order is moot: every kernel this CPU runs, the AMX hardware's
    and its emulation included, gives the same bits, and those match the float64 reference (up to S = 256: its
    bound's [B, H, S, S, Dh] intermediate would take a GB at S = 1024)."""
    qkv = exact_qkv(B, S, H, Dh)
    mask = key_mask(B, S, "pad")
    mask[:, 0] = True  # key 0 holds every query's max
    outs = {}
    for isa in filter(runnable, ISAS):
        outs[isa] = np.full((B * S, H * Dh), np.nan, np.float32)
        _cpu.vision_attention(qkv, B, S, H, mask, outs[isa], isa)
    assert "amx-emulated" in outs and "f32" in outs
    for isa, out in outs.items():
        np.testing.assert_array_equal(out, outs["f32"], err_msg=isa)
    if S <= 256:
        expect, bound = ref.attention(qkv.astype(np.float64), B, S, H, mask, scale_of(Dh))
        assert (np.abs(outs["f32"] - expect) <= bound).all()


def test_attention_kernel_choice():
    """isa None is what the encoder runs: the products' kernel (bf16_isa), so SMOLVLM_FAST_CPU_ISA moves both."""
    assert _cpu.vision_attention_isa() in ISAS and runnable(_cpu.vision_attention_isa())
    assert _cpu.vision_attention_isa() == _cpu.bf16_isa()
    code = "from smolvlm_fast import _cpu; print(_cpu.vision_attention_isa())"
    for cap, expect in (("avx512bf16", "avx512bf16" if runnable("avx512bf16") else "f32"), ("f32", "f32")):
        env = {**os.environ, "SMOLVLM_FAST_CPU_ISA": cap}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expect, (cap, done.stdout, done.stderr)


def test_attention_bad_arguments():
    B, S, H, Dh = 2, 5, 2, 32
    qkv, out = np.ones((B * S, 3 * H * Dh), np.float32), np.empty((B * S, H * Dh), np.float32)
    with pytest.raises(ValueError, match="qkv must be float32"):
        _cpu.vision_attention(qkv.astype(np.float64), B, S, H, None, out)
    with pytest.raises(ValueError, match="qkv must have shape"):
        _cpu.vision_attention(qkv, B, S + 1, H, None, out)
    with pytest.raises(ValueError, match=r"qkv must be \[B \* S, 3 \* heads"):
        _cpu.vision_attention(qkv, B, S, 5, None, out)
    with pytest.raises(ValueError, match="out must have shape"):
        _cpu.vision_attention(qkv, B, S, H, None, out[:-1])
    with pytest.raises(ValueError, match="out overlaps qkv"):
        _cpu.vision_attention(qkv, B, S, H, None, qkv.reshape(-1)[:out.size].reshape(out.shape))
    with pytest.raises(ValueError, match="masks every key"):
        _cpu.vision_attention(qkv, B, S, H, np.zeros((B, S), bool), out)
    with pytest.raises(ValueError, match="key_mask must be uint8 or bool"):
        _cpu.vision_attention(qkv, B, S, H, np.ones((B, S), np.int32), out)
    with pytest.raises(ValueError, match="need B >= 0 tiles of S >= 1"):
        _cpu.vision_attention(qkv[:0], 1, 0, H, None, out[:0])
    for bad in ("sse2", True):
        with pytest.raises(ValueError, match="isa must be None or one of"):
            _cpu.vision_attention(qkv, B, S, H, None, out, bad)
    for isa in ISAS:
        if not runnable(isa):
            with pytest.raises(ValueError, match=f"cannot run the {isa} kernel"):
                _cpu.vision_attention(qkv, B, S, H, None, out, isa)


# ---------------------------------------------------------------- the whole encoder

def random_checkpoint(D: int, H: int, layers: int = 2) -> tuple[dict, VisionConfig]:
    """A random SigLIP encoder under the checkpoint's names (q/k scaled up so that attention is far from flat)."""
    cfg = VisionConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=layers, num_attention_heads=H,
                       image_size=64, patch_size=8)
    f = lambda *shape, s=1.0: (RNG.standard_normal(shape) * s).astype(np.float32)
    w = {}
    for i in range(layers):
        p = f"{vision_numpy.VISION}encoder.layers.{i}."
        for n, sd in (("q_proj", 3.0), ("k_proj", 3.0), ("v_proj", 1.0), ("out_proj", 1.0)):
            w[p + f"self_attn.{n}.weight"], w[p + f"self_attn.{n}.bias"] = f(D, D, s=sd / np.sqrt(D)), f(D, s=0.1)
        w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"] = f(4 * D, D, s=1 / np.sqrt(D)), f(4 * D, s=0.1)
        w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"] = f(D, 4 * D, s=1 / np.sqrt(4 * D)), f(D, s=0.1)
        for n in ("layer_norm1", "layer_norm2"):
            w[p + f"{n}.weight"], w[p + f"{n}.bias"] = 1 + f(D, s=0.1), f(D, s=0.1)
    w[vision_numpy.VISION + "post_layernorm.weight"] = 1 + f(D, s=0.1)
    w[vision_numpy.VISION + "post_layernorm.bias"] = f(D, s=0.1)
    return w, cfg


def reference_layers(w: dict, cfg: VisionConfig) -> tuple[list[dict], tuple]:
    """The checkpoint in the reference's terms (float64), q/k/v stacked."""
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"{vision_numpy.VISION}encoder.layers.{i}."
        L = {key: w[p + name].astype(np.float64) for key, name in cpu_vision.LAYER_NAMES.items()}
        L["qkv_weight"] = np.concatenate([w[p + f"self_attn.{n}.weight"] for n in cpu_vision.QKV]).astype(np.float64)
        L["qkv_bias"] = np.concatenate([w[p + f"self_attn.{n}.bias"] for n in cpu_vision.QKV]).astype(np.float64)
        layers.append(L)
    post = tuple(w[vision_numpy.VISION + f"post_layernorm.{t}"].astype(np.float64) for t in ("weight", "bias"))
    return layers, post


def numpy_float32(w: dict, cfg: VisionConfig, x: np.ndarray, mask) -> np.ndarray:
    """vision_numpy's float32 encoder layers and post norm over x [B, S, D]."""
    for i in range(cfg.num_hidden_layers):
        x = vision_numpy.vision_layer(w, f"{vision_numpy.VISION}encoder.layers.{i}.", cfg, x, mask)
    return numpy_ops.layer_norm(x, w[vision_numpy.VISION + "post_layernorm.weight"],
                                w[vision_numpy.VISION + "post_layernorm.bias"], cfg.layer_norm_eps)


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


@pytest.mark.parametrize("B,S,D,H", [(1, 1, 64, 2), (2, 3, 64, 2), (3, 17, 128, 4), (1, 64, 192, 3), (2, 100, 128, 2),
                                     (3, 100, 96, 3)])
@pytest.mark.parametrize("mask_kind", ["none", "one"])
def test_encoder_matches_the_same_arithmetic(B, S, D, H, mask_kind):
    w, cfg = random_checkpoint(D, H)
    x = RNG.standard_normal((B, S, D), dtype=np.float32)
    mask = key_mask(B, S, mask_kind)
    ours = cpu_vision.run_encoder(cpu_vision.build_encoder(w, cfg), x, mask)  # [B, S, D]
    assert ours.shape == x.shape and np.isfinite(ours).all()

    layers, post = reference_layers(w, cfg)
    args = (layers, post, H, EPS, x.reshape(B * S, D), B, S, mask)
    same = ref.encoder(*args).reshape(B, S, D)
    flipped = ref.encoder(*args, flip=True).reshape(B, S, D)
    floor = 8 * ref.U32 * rms(same)  # where nothing can flip: a few float32 roundings of the result
    assert rms(ours - same) <= rms(flipped - same) + floor, (rms(ours - same), rms(flipped - same))

    f32 = numpy_float32(w, cfg, x, mask)
    assert np.abs(ours - f32).max() <= 2 * np.abs(same - f32).max()
    assert rms(ours - f32) <= 2 * rms(same - f32)


def test_encoder_tiles_are_independent():
    """Each tile's rows depend on that tile alone: run together or one at a time, the same result up to bf16 flips.

    Only the products' blocking differs between the two runs, so each is within the flip bound of
    test_encoder_matches_the_same_arithmetic of the same-arithmetic reference, and the two are within twice that
    of each other (triangle inequality). A mask or offset that leaked one tile into another moves rows by O(1)."""
    w, cfg = random_checkpoint(64, 2)
    encoder = cpu_vision.build_encoder(w, cfg)
    x = RNG.standard_normal((3, 17, 64), dtype=np.float32)
    mask = key_mask(3, 17, "one")
    together = cpu_vision.run_encoder(encoder, x, mask)
    layers, post = reference_layers(w, cfg)
    for b in range(3):
        alone = cpu_vision.run_encoder(encoder, x[b:b + 1], mask[b:b + 1])[0]  # [17, 64]
        args = (layers, post, 2, EPS, x[b], 1, 17, mask[b:b + 1])
        same = ref.encoder(*args)
        flip_bound = rms(ref.encoder(*args, flip=True) - same) + 8 * ref.U32 * rms(same)
        assert rms(alone - together[b]) <= 2 * flip_bound, (b, rms(alone - together[b]), flip_bound)


def test_encoder_bad_arguments():
    w, cfg = random_checkpoint(64, 2, layers=1)
    encoder = cpu_vision.build_encoder(w, cfg)
    assert (len(encoder), encoder.hidden_size, encoder.intermediate_size, encoder.num_heads) == (1, 64, 256, 2)
    x = np.zeros((2 * 5, 64), np.float32)
    with pytest.raises(ValueError, match="x must have shape"):
        encoder.run(x, 2, 4)
    with pytest.raises(ValueError, match="x must be float32"):
        encoder.run(x.astype(np.float64), 2, 5)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        encoder.run(np.zeros((64, 10), np.float32).T, 2, 5)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="x must be writeable"):
        encoder.run(x, 2, 5)
    x = np.zeros((2 * 5, 64), np.float32)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        encoder.run(x, 2, 5, np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"key_mask\[1\] masks every key"):
        encoder.run(x, 2, 5, np.array([[1, 0, 0, 0, 0], [0] * 5], np.uint8))
    with pytest.raises(ValueError, match="need B >= 0 tiles of S >= 1"):
        encoder.run(x[:0], 2, 0)
    with pytest.raises(InputError, match="no real patch"):
        cpu_vision.run_encoder(encoder, x.reshape(2, 5, 64), np.zeros((2, 5), bool))

    layers, post = reference_layers(w, cfg)
    good = [{k: v.astype(np.float32) for k, v in layers[0].items()}]
    post32 = [p.astype(np.float32) for p in post]
    with pytest.raises(ValueError, match="layer 0 has no fc2_bias"):
        _cpu.VisionEncoder([{k: v for k, v in good[0].items() if k != "fc2_bias"}], *post32, 2, EPS)
    with pytest.raises(ValueError, match="layer 0 qkv_weight must have shape"):
        _cpu.VisionEncoder([dict(good[0], qkv_weight=good[0]["qkv_weight"][:-1])], *post32, 2, EPS)
    with pytest.raises(ValueError, match="layer 0 ln1_weight must be float32"):
        _cpu.VisionEncoder([dict(good[0], ln1_weight=layers[0]["ln1_weight"])], *post32, 2, EPS)
    with pytest.raises(ValueError, match="multiple of heads"):
        _cpu.VisionEncoder(good, *post32, 3, EPS)
    with pytest.raises(ValueError, match="eps must be finite"):
        _cpu.VisionEncoder(good, *post32, 2, float("nan"))


def test_precision_is_checked(tiny_idefics3):
    from smolvlm_fast.models.smolvlm_numpy import NumpyModel

    model = NumpyModel.from_checkpoint(tiny_idefics3)
    size = model.config.vision.image_size
    pixels = RNG.uniform(-1, 1, (1, 1, 3, size, size)).astype(np.float32)
    with pytest.raises(InputError, match="precision must be one of"):
        vision_numpy.image_features_per_row(model.weights, model.config, pixels, precision="float16")
    default = vision_numpy.image_features_per_row(model.weights, model.config, pixels)[0]
    np.testing.assert_array_equal(default, vision_numpy.image_features_per_row(
        model.weights, model.config, pixels, precision="float32")[0])
