"""The CUDA kernels (csrc/cuda/ through smolvlm_fast.ops.cuda) against the PyTorch reference and the Triton kernels.

Marked `gpu` (they skip without CUDA) but for the check that CPU tensors are refused and the dispatch tests. Rules
(smolvlm_fast/ops/README.md): fresh random inputs; outputs NaN before the call (and the cache slots, image tokens and
blocks no sequence owns NaN too, through the Triton tests' input builders), so an element never written or a padded
one read fails; the reference in float64 on the inputs as the kernel sees them; fp16 / bf16 within twice the error of
the plain PyTorch op in the same precision (FlashAttention's rule), fp32 within 1e-5 relative. Each CUDA result is
also held against the Triton kernel's on the same inputs (both within twice PyTorch's error: within four times of
each other).
Shapes: head_dim 64, 80 and 128, 9 query heads over 3 KV heads (and 15/5, 16/1, 32/32), contexts ending mid-block and
on a block edge, single-token decode, hidden sizes 576 and 960 (not multiples of 128), K splits and context splits
forced. `-k small` selects one small case per op (what bench/gpu_check.sh runs under compute-sanitizer).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from smolvlm_fast import ops
from smolvlm_fast.formats import int4 as int4_format
from smolvlm_fast.models.int4_linear import Int4Tensors
from smolvlm_fast.ops import cuda, reference, registry

from .test_kernel_cross_attention import make_inputs as cross_inputs
from .test_kernel_cross_attention import reference_f64 as cross_reference
from .test_kernel_paged_attention import make_inputs as paged_inputs
from .test_kernel_paged_attention import pytorch_error as paged_pytorch_error
from .test_kernel_paged_attention import reference_f64 as paged_reference
from .test_kernel_write_kv_cache import make_slots, nan_cache

pytestmark = pytest.mark.skipif(not cuda.available(), reason="smolvlm_fast._C is not built")
GPU = pytest.mark.gpu
LOW = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ALL = [pytest.param(torch.float32, id="fp32"), *LOW]
RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def error(out: torch.Tensor, expect: torch.Tensor) -> float:
    return (out.double().cpu() - expect.double().cpu()).abs().max().item()


def assert_close_to_reference(out, expect, plain, triton_out=None, what=""):
    """out (the CUDA kernel) against expect (fp64): fp32 within 1e-5 relative; fp16 / bf16 within twice the plain
    PyTorch op's error (plain: that op in out's precision); and within twice that limit of the Triton kernel."""
    assert not out.isnan().any(), f"{what}: {int(out.isnan().sum())} NaN outputs (unwritten, or a poisoned input read)"
    err = error(out, expect)
    if out.dtype == torch.float32:
        limit = 1e-5 * expect.abs().max().item()
    else:
        limit = 2 * error(plain, expect) + 1e-6
    assert err <= limit, f"{what}: {out.dtype} error {err:.3g} > {limit:.3g}"
    if triton_out is not None:
        diff = error(out, triton_out)
        assert diff <= 2 * limit, f"{what}: CUDA and Triton differ by {diff:.3g} (> {2 * limit:.3g})"


def test_cpu_tensors_are_refused():
    """impl="cuda" on CPU tensors: a clear error, not a crash."""
    with pytest.raises(ValueError, match="CUDA device"):
        ops.write_kv_cache(torch.randn(1, 1, 64), torch.randn(1, 1, 64), torch.zeros(1, 16, 1, 64),
                           torch.zeros(1, 16, 1, 64), torch.zeros(1, dtype=torch.int32), impl="cuda")
    with pytest.raises(ValueError, match="CUDA device"):
        cuda.cross_attention(torch.randn(1, 1, 2, 64), torch.randn(1, 4, 1, 64), torch.randn(1, 4, 1, 64))


def test_wrappers_pass_the_kernels_checks(monkeypatch):
    """Without a GPU: each wrapper, given CPU tensors past its device check, builds a call that every argument check
    of its entry point accepts, so it fails only where CUDA starts (RuntimeError), not with a ValueError / TypeError
    from a misplaced size, stride or pointer."""
    if cuda._C.device_count() > 0:
        pytest.skip("a GPU is present: the gpu tests run the kernels")
    monkeypatch.setattr(cuda, "_require_cuda", lambda op, *tensors: None)
    monkeypatch.setattr(cuda, "_device", lambda t: 0)
    monkeypatch.setattr(cuda, "_stream", lambda t: 0)
    monkeypatch.setattr(cuda, "_num_sms", lambda device: 132)
    bf16 = torch.bfloat16
    calls = []
    for symmetric in (False, True):
        w = Int4Tensors.from_numpy(int4_format.quantize_int4(np.random.randn(40, 576).astype(np.float32), group_size=64,
                                                       symmetric=symmetric))
        calls.append(lambda w=w: cuda.int4_gemm(torch.randn(3, 576, dtype=bf16), w, torch.randn(40, dtype=bf16)))
        calls.append(lambda w=w: cuda.int4_gemm(torch.randn(9, 576, dtype=torch.float16), w, split_k=4))
    for rotary_dim, varlen in ((None, False), (64, True), (40, False)):
        args, kwargs = paged_inputs([5, 40, 700], None, rotary_dim=rotary_dim, dtype=bf16)
        if varlen:
            kwargs["query_start_loc"] = torch.arange(4, dtype=torch.int32)
        calls.append(lambda a=args, k=kwargs: cuda.paged_attention(*a, **k))
    k, v = torch.randn(4, 3, 64, dtype=bf16), torch.randn(4, 3, 64, dtype=bf16)
    cache = torch.zeros(4, 16, 3, 64, dtype=bf16)
    slots = torch.tensor([3, -1, 17, 40])
    calls.append(lambda: cuda.write_kv_cache(k, v, cache, cache.clone(), slots))
    table = reference.rope_table(32, 50, 1e4)
    calls.append(lambda: cuda.write_kv_cache(k, v, cache, cache.clone(), slots, cos_sin=table, positions=torch.arange(4),
                                             rotary_dim=32))
    q, kk, vv, lens = cross_inputs(2, 1, 700, 9, 3, 80, [700, 5], dtype=torch.float16)
    calls.append(lambda: cuda.cross_attention(q, kk, vv, kv_lens=lens))
    pixels = torch.randn(2, 3, 32, 48, dtype=bf16)
    calls.append(lambda: cuda.patch_embed(pixels, torch.randn(64, 3, 16, 16, dtype=bf16), torch.randn(64, dtype=bf16),
                                          torch.randn(10, 64), torch.randint(0, 10, (2, 6))))
    dw_w, pw_w, pw_b = torch.randn(3, 1, 16, 16, dtype=bf16), torch.randn(64, 3, dtype=bf16), torch.randn(64, dtype=bf16)
    calls.append(lambda: cuda.dwsep_patch_embed(pixels, dw_w, None, pw_w, pw_b, None, None))
    for call in calls:
        with pytest.raises(RuntimeError, match="cudaGetDevice"):  # the DeviceGuard: the first CUDA call
            call()


@GPU
def test_cuda_is_the_default_on_cuda_tensors():
    args, kwargs = paged_inputs([5, 40], None, rotary_dim=64, dtype=torch.bfloat16, device="cuda")
    assert registry.pick("paged_attention", None, args, kwargs).name == "cuda"
    with ops.prefer("triton"):
        assert registry.pick("paged_attention", None, args, kwargs).name == "triton"


def test_cuda_comes_first_and_the_reference_last():
    for name in ops.OPS:
        order = ops.available(name)
        assert order == sorted(order, key=registry.ORDER.index) and order[-1] == "reference", name
        assert ("cuda" in order) == (name in cuda.OPS), name


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: enough for the registry's device test, which reads `is_cuda` only."""

    @property
    def is_cuda(self):
        return True


def cuda_like(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(FakeCuda)


def test_the_walk_takes_the_first_implementation_that_covers_the_call():
    """Decode goes to the CUDA kernel, a prefill batch (more queries than sequences) past it to Triton; CPU tensors
    to the reference; `explain` gives the same answer with its reasons."""
    args, kwargs = paged_inputs([5, 40], None, rotary_dim=64, dtype=torch.bfloat16)
    decode = (cuda_like(args[0]), *args[1:])
    assert registry.pick("paged_attention", None, decode, kwargs).name == "cuda"
    prefill_args, prefill_kwargs = paged_inputs([24, 18], [24, 1], rotary_dim=64, dtype=torch.bfloat16)
    prefill = (cuda_like(prefill_args[0]), *prefill_args[1:])
    if "triton" in ops.available("paged_attention"):
        assert registry.pick("paged_attention", None, prefill, prefill_kwargs).name == "triton"
        why = ops.explain("paged_attention", *prefill, **prefill_kwargs).splitlines()
        assert why[0].endswith("runs triton") and why[1].split()[:2] == ["cuda", "does"], why
    assert registry.pick("paged_attention", None, args, kwargs).name == "reference"
    assert registry.pick("paged_attention", "cuda", prefill_args, prefill_kwargs).name == "cuda"  # off its device


@pytest.mark.parametrize("dtype, rows, covered", [(torch.bfloat16, 1, True), (torch.float16, 16, True),
                                                 (torch.bfloat16, 17, False), (torch.float32, 4, False)])
def test_int4_gemm_covers(dtype, rows, covered):
    """The kernel's limits, as the registry reads them: fp16 / bf16 x with 1..16 rows."""
    w = Int4Tensors.from_numpy(int4_format.quantize_int4(RNG.standard_normal((40, 576), dtype=np.float32),
                                                         group_size=64))
    x = torch.randn(rows, 576).to(dtype)
    assert cuda.COVERS["int4_gemm"](x, w, None) is covered
    assert registry.pick("int4_gemm", "cuda", (cuda_like(x), w, None), {}).name == ("cuda" if covered else "triton")
    if not covered:
        with pytest.raises(ValueError, match="outside the CUDA kernel"):
            cuda.int4_gemm(x, w)  # the module's own name never launches a call the kernel does not cover


def test_cuda_is_handed_no_dispatcher():
    """ops.cuda knows its kernels only: the registry walks on past it (no import of ops back, so no circle)."""
    from .test_layout import GRAPH

    for module in ("smolvlm_fast.ops.cuda", "smolvlm_fast.ops.cuda_limits"):
        assert not GRAPH[module] & {"smolvlm_fast.ops", "smolvlm_fast.ops.registry"}, GRAPH[module]
    assert "smolvlm_fast.ops.cuda" not in GRAPH["smolvlm_fast.ops"]  # the registry imports it, on first use


# ---------------------------------------------------------------- int4_gemm

def make_int4(M, N, K, group_size, symmetric, dtype, bias=True):
    w = RNG.standard_normal((N, K), dtype=np.float32) * RNG.uniform(0.01, 0.1, (N, 1)).astype(np.float32)
    w[RNG.random((N, K)) < 0.003] *= 15  # a few outliers, as real weights have
    weight = Int4Tensors.from_numpy(int4_format.quantize_int4(w, group_size=group_size, symmetric=symmetric), "cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    b = torch.randn(N, device="cuda").to(dtype) if bias else None
    return x, weight, b


def int4_expected(x, w, b):
    cpu = Int4Tensors(w.N, w.K, w.group_size, w.symmetric, w.qweight.cpu(), w.scales.cpu(),
                      None if w.mins is None else w.mins.cpu())
    return reference.int4_gemm(x.cpu().double(), cpu, None if b is None else b.cpu().double())


def int4_plain(x, w, b):
    y = x @ reference.dequantize_int4(w).to(x.dtype).T
    return y if b is None else y + b


def check_int4(x, w, b, split_k=None, what="int4_gemm"):
    from smolvlm_fast.kernels.int4_gemm import int4_gemm as triton_int4_gemm

    out = nan_like(torch.empty(x.shape[0], w.N, dtype=x.dtype, device="cuda"))
    assert cuda.int4_gemm(x, w, b, out=out, split_k=split_k) is out
    assert_close_to_reference(out, int4_expected(x, w, b), int4_plain(x, w, b), triton_int4_gemm(x, w, b), what)


# (N, K, group_size): SmolLM2-135M's qkv (960 = 576 + 2 x 192), o_proj and gate_up at K = 576, down_proj at
# K = 1536, SmolVLM-256M's vision fc at K = 768, N = 40 and 72 ending mid-tile, K = 256 (8 blocks) with group 128.
INT4_SHAPES = [(960, 576, 64), (576, 576, 32), (3072, 576, 64), (576, 1536, 64), (3072, 768, 128), (40, 576, 64),
               (72, 256, 128), (2560, 960, 32)]


@GPU
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("N, K, group_size", INT4_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_int4_gemm(dtype, M, N, K, group_size, symmetric):
    check_int4(*make_int4(M, N, K, group_size, symmetric, dtype))


@GPU
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("split_k", [1, 2, 5, 18], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("M", [1, 12])
def test_int4_gemm_split_k(dtype, split_k, M):
    """K = 576 = 18 blocks: 2 splits of 9 blocks (steps of 4 end mid-step), 5 of 4 (the last one 2), 18 of one."""
    check_int4(*make_int4(M, 40, 576, 32, False, dtype), split_k=split_k)


@GPU
@pytest.mark.parametrize("dtype", LOW)
def test_int4_gemm_big_k_and_n(dtype):
    """K = 8192 (256 blocks: 8 staged chunks of x) and an LM head's N = 49152 (768 thread blocks, no split)."""
    check_int4(*make_int4(3, 128, 8192, 128, False, dtype), what="K=8192")
    check_int4(*make_int4(1, 49152, 576, 64, True, dtype, bias=False), what="N=49152")


@GPU
@pytest.mark.parametrize("dtype", LOW)
def test_int4_gemm_strided_and_sliced(dtype):
    """x a column slice of a wider tensor (misaligned rows: copied first), the weight a row slice of a stacked one."""
    wide = torch.randn(5, 700, device="cuda").to(dtype)
    x = wide[:, 50:626]
    _, full, _ = make_int4(1, 96, 576, 64, False, dtype)
    w = Int4Tensors(40, 576, 64, False, full.qweight[30:70], full.scales[30:70], full.mins[30:70])
    check_int4(x, w, None)


@GPU
def test_int4_gemm_outside_the_kernel_goes_to_triton():
    from smolvlm_fast.kernels.int4_gemm import int4_gemm as triton_int4_gemm

    for M, dtype in ((17, torch.bfloat16), (300, torch.float16), (4, torch.float32)):
        x, w, b = make_int4(M, 960, 576, 64, False, dtype)
        torch.testing.assert_close(ops.int4_gemm(x, w, b, impl="cuda"), triton_int4_gemm(x, w, b), rtol=0, atol=0)


# ---------------------------------------------------------------- paged_attention (decode)

PAGED_SEQ_LENS = [1, 16, 17, 517, 4096, 1000, 3000]  # one token, a block edge, mid-block, long


@GPU
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("split_size", [None, 64, 512], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("block_size, head_dim, heads, rotary_dim", [
    (16, 64, (9, 3), 64), (32, 80, (15, 5), 40), (16, 64, (32, 32), None), (16, 128, (32, 4), 128),
    (16, 96, (16, 1), 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("varlen", [False, True], ids=["decode", "decode-varlen"])
def test_paged_attention(dtype, split_size, block_size, head_dim, heads, rotary_dim, varlen):
    """9/3: SmolVLM-256M; 15/5 with partial rotary (d80); MHA; 8 heads per KV head; 16 per KV head (two blocks of
    heads per KV head). varlen: query_start_loc given, one query per sequence (how the model calls it)."""
    from smolvlm_fast.kernels.paged_attention import paged_attention as triton_paged_attention

    args, kwargs = paged_inputs(PAGED_SEQ_LENS, None, heads=heads, head_dim=head_dim, block_size=block_size,
                                rotary_dim=rotary_dim, device="cuda")
    if varlen:
        kwargs["query_start_loc"] = torch.arange(len(PAGED_SEQ_LENS) + 1, dtype=torch.int32, device="cuda")
    expect = paged_reference(args, kwargs)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
    out = nan_like(low[0])
    assert cuda.paged_attention(*low, **kwargs, out=out, split_size=split_size) is out
    plain_err = paged_pytorch_error(args, kwargs, dtype, expect) if dtype != torch.float32 else 0.0
    assert not out.isnan().any()
    err = error(out, expect)
    limit = 1e-5 * expect.abs().max().item() if dtype == torch.float32 else 2 * plain_err + 1e-6
    assert err <= limit, f"{dtype} error {err:.3g} > {limit:.3g}"
    tri = triton_paged_attention(*low, **kwargs, split_size=split_size)
    assert error(out, tri) <= 2 * limit


@GPU
def test_paged_attention_max_seq_len_and_scale():
    """An explicit max_seq_len (no capacity bound: fewer splits) and scale give the reference's result."""
    args, kwargs = paged_inputs([5, 300, 64], None, block_size=16, rotary_dim=64, device="cuda")
    expect = paged_reference(args, dict(kwargs, scale=0.3))
    out = cuda.paged_attention(*args, **kwargs, scale=0.3, max_seq_len=300, split_size=128)
    assert error(out, expect) <= 1e-5 * expect.abs().max().item()


@GPU
def test_paged_attention_prefill_goes_to_triton():
    from smolvlm_fast.kernels.paged_attention import paged_attention as triton_paged_attention

    args, kwargs = paged_inputs([24, 18, 100], [24, 1, 13], rotary_dim=64, device="cuda")
    low = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in args)
    torch.testing.assert_close(ops.paged_attention(*low, **kwargs, impl="cuda"), triton_paged_attention(*low, **kwargs),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- write_kv_cache

def check_write_kv_cache(k, v, slots, shape, rope, what=""):
    """Written slots as the reference writes them (k within twice PyTorch's rounding error of the fp64 rotation, v
    bit-exact), every other slot still NaN; the same against the Triton kernel."""
    from smolvlm_fast.kernels.write_kv_cache import write_kv_cache as triton_write_kv_cache

    def caches(dtype):
        return nan_cache(*shape, dtype, k.device), nan_cache(*shape, dtype, k.device)

    ours, plain, exact, tri = caches(k.dtype), caches(k.dtype), caches(torch.float64), caches(k.dtype)
    cuda.write_kv_cache(k, v, *ours, slots, **rope)
    reference.write_kv_cache(k, v, *plain, slots, **rope)
    reference.write_kv_cache(k.double(), v.double(), *exact, slots, **rope)
    triton_write_kv_cache(k, v, *tri, slots, **rope)
    written = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=k.device)
    written[slots[slots >= 0].long()] = True
    for cache in ours:
        flat = cache.flatten(0, 1)
        assert flat[~written].isnan().all(), f"{what}: a slot not in slot_mapping changed"
        assert torch.isfinite(flat[written]).all(), f"{what}: a written slot was left (partly) NaN"
    assert torch.equal(ours[1].flatten(0, 1)[written], plain[1].flatten(0, 1)[written]), f"{what}: v is a copy"
    k_ours, k_plain, k_exact, k_tri = (c[0].flatten(0, 1)[written] for c in (ours, plain, exact, tri))
    if not rope:
        assert torch.equal(k_ours, k_plain)
    else:
        assert_close_to_reference(k_ours, k_exact, k_plain, k_tri, what)


@GPU
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("heads, head_dim", [(3, 64), (5, 80), (3, 128)], ids=lambda v: str(v))
@pytest.mark.parametrize("rotary", ["none", "full", "half"])
@pytest.mark.parametrize("num_tokens", [1, 9, 300])
def test_write_kv_cache(dtype, heads, head_dim, rotary, num_tokens):
    """d64 / d128 take 16-byte moves; d80 with half rotary (R/2 = 20) moves element by element."""
    block_size, num_blocks = 16, 40
    shape = (num_blocks, block_size, heads, head_dim)
    k = torch.randn(num_tokens, heads, head_dim, device="cuda").to(dtype)
    v = torch.randn(num_tokens, heads, head_dim, device="cuda").to(dtype)
    slots = make_slots(max(num_tokens, 5), num_blocks, block_size, "cuda")[:num_tokens]
    rope = {}
    if rotary != "none":
        rotary_dim = head_dim if rotary == "full" else head_dim // 2
        rope = {"cos_sin": reference.rope_table(rotary_dim, 8192, 100000.0, device="cuda"),
                "positions": torch.randint(0, 8192, (num_tokens,), dtype=torch.int32, device="cuda"),
                "rotary_dim": rotary_dim}
    check_write_kv_cache(k, v, slots, shape, rope, f"{dtype} {rotary}")


@GPU
@pytest.mark.parametrize("dtype", LOW)
def test_write_kv_cache_strided(dtype):
    """k, v slices of a fused qkv output, int64 slots and positions, a cache viewed from a bigger buffer."""
    T, hq, hkv, head_dim, block_size = 6, 9, 3, 64, 16
    qkv = torch.randn(T, hq + 2 * hkv, head_dim, device="cuda").to(dtype)
    k, v = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    slots = make_slots(T, 3, block_size, "cuda", dtype=torch.int64)
    rope = {"cos_sin": reference.rope_table(head_dim, 300, 10000.0, device="cuda"),
            "positions": torch.randint(0, 300, (T,), device="cuda")}
    buffer = torch.full((3, block_size + 2, hkv, head_dim), float("nan"), dtype=dtype, device="cuda")
    k_cache, v_cache = buffer[:, :block_size], nan_cache(3, block_size, hkv, head_dim, dtype, "cuda")
    cuda.write_kv_cache(k, v, k_cache, v_cache, slots, **rope)
    k_ref, v_ref = (nan_cache(3, block_size, hkv, head_dim, dtype, "cuda") for _ in range(2))
    reference.write_kv_cache(k, v, k_ref, v_ref, slots, **rope)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(k_cache, k_ref, rtol=2e-2, atol=2e-2, equal_nan=True)  # rounding differs (see above)
    assert buffer[:, block_size:].isnan().all(), "wrote outside the cache view"


# ---------------------------------------------------------------- cross_attention

# (B, S, T, Hq, Hkv, Dh, kv_lens): decode over 64 / 1088 image tokens (SmolVLM-256M's 1 and 17 tiles), GQA 9/3 and
# 15/5, MHA, padded rows (one empty), a few text queries at once, and 5000 tokens (many splits).
CROSS_SHAPES = [
    pytest.param(3, 1, 50, 9, 3, 64, [50, 0, 17], id="gqa9x3-d64-T50"),
    pytest.param(2, 1, 1088, 15, 5, 80, [1088, 700], id="gqa15x5-d80-T1088"),
    pytest.param(2, 1, 64, 16, 16, 64, None, id="mha16-d64-T64"),
    pytest.param(2, 4, 300, 9, 3, 128, [300, 1], id="gqa9x3-d128-S4"),
    pytest.param(1, 1, 5000, 12, 4, 64, None, id="gqa12x4-d64-T5000"),
]


@GPU
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("B, S, T, Hq, Hkv, Dh, kv_lens", CROSS_SHAPES)
def test_cross_attention(dtype, B, S, T, Hq, Hkv, Dh, kv_lens):
    from smolvlm_fast.kernels.cross_attention import cross_attention as triton_cross_attention

    q, k, v, lens = cross_inputs(B, S, T, Hq, Hkv, Dh, kv_lens, device="cuda")
    expect = cross_reference(q, k, v, lens)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    out = nan_like(ql)
    assert cuda.cross_attention(ql, kl, vl, kv_lens=lens, out=out) is out
    plain = reference.cross_attention(ql, kl, vl, kv_lens=lens)
    assert_close_to_reference(out, expect, plain, triton_cross_attention(ql, kl, vl, kv_lens=lens), "cross_attention")
    if kv_lens is not None and 0 in kv_lens:
        assert (out[lens == 0] == 0).all()


# ---------------------------------------------------------------- patch_embed / dwsep_patch_embed

def patch_case(B, C, H, W, P, D, positions, dtype, pos_dtype=None, channels_last=False):
    pixels = torch.randn(B, C, H, W, device="cuda").to(dtype)
    if channels_last:
        pixels = pixels.to(memory_format=torch.channels_last)
    N = (H // P) * (W // P)
    pos_embed = ids = None
    if positions != "none":
        pos_embed = torch.randn(max(N, 25) + 3, D, device="cuda").to(pos_dtype or dtype)
    if positions == "ids":
        ids = torch.randint(0, pos_embed.shape[0], (B, N), device="cuda")
    return pixels, pos_embed, ids


@GPU
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("H, W, P, D", [(64, 96, 16, 768), (512, 512, 16, 768), (56, 70, 14, 40), (48, 48, 16, 1152)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("positions", ["ids", "arange", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_patch_embed(dtype, H, W, P, D, positions, bias):
    """P = 16 takes 16-byte tile loads, P = 14 element loads; D = 40 ends mid-tile; 512 x 512 is one SigLIP tile."""
    from smolvlm_fast.kernels.patch_embed import patch_embed as triton_patch_embed

    pixels, pos_embed, ids = patch_case(2, 3, H, W, P, D, positions, dtype)
    weight = (torch.randn(D, 3, P, P, device="cuda") * 0.05).to(dtype)
    b = torch.randn(D, device="cuda").to(dtype) if bias else None
    expect = reference.patch_embed(pixels.double(), weight.double(), None if b is None else b.double(),
                                   None if pos_embed is None else pos_embed.double(), ids)
    out = cuda.patch_embed(pixels, weight, b, pos_embed, ids)
    plain = reference.patch_embed(pixels, weight, b, pos_embed, ids)
    assert_close_to_reference(out, expect, plain, triton_patch_embed(pixels, weight, b, pos_embed, ids), "patch_embed")


@GPU
@pytest.mark.parametrize("dtype", LOW)
def test_patch_embed_strided_pixels_and_fp32_positions(dtype):
    """channels_last pixels (element loads), an fp32 position table (the output promoted to fp32), into `out`."""
    pixels, pos_embed, ids = patch_case(2, 3, 64, 48, 16, 96, "ids", dtype, pos_dtype=torch.float32,
                                        channels_last=True)
    weight = (torch.randn(96, 3, 16, 16, device="cuda") * 0.05).to(dtype)
    b = torch.randn(96, device="cuda").to(dtype)
    out = torch.full((2, 12, 96), float("nan"), device="cuda")
    assert cuda.patch_embed(pixels, weight, b, pos_embed, ids, out=out) is out
    expect = reference.patch_embed(pixels.double(), weight.double(), b.double(), pos_embed.double(), ids)
    plain = reference.patch_embed(pixels, weight, b, pos_embed, ids)
    assert_close_to_reference(out, expect, plain, what="channels_last")  # fp32 out: within 1e-5 relative


@GPU
def test_grouped_patch_embed_goes_to_triton():
    from smolvlm_fast.kernels.patch_embed import patch_embed as triton_patch_embed

    pixels = torch.randn(2, 6, 32, 48, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(12, 2, 16, 16, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(ops.patch_embed(pixels, weight, None, None, None, groups=3, impl="cuda"),
                               triton_patch_embed(pixels, weight, None, None, None, groups=3), rtol=0, atol=0)


@GPU
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("C, D, P, H, W", [(3, 192, 16, 224, 224), (3, 40, 14, 56, 70), (64, 96, 16, 64, 48)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("positions", ["ids", "arange", "none"])
def test_dwsep_patch_embed(dtype, C, D, P, H, W, positions):
    """The factorized stem at 224 x 224 (196 patches, 16 per block: the last one partly empty), P = 14, 64 channels."""
    from smolvlm_fast.kernels.patch_embed import dwsep_patch_embed as triton_dwsep

    pixels, pos_embed, ids = patch_case(2, C, H, W, P, D, positions, dtype)
    dw_w = (torch.randn(C, 1, P, P, device="cuda") * 0.1).to(dtype)
    dw_b = torch.randn(C, device="cuda").to(dtype)
    pw_w = (torch.randn(D, C, device="cuda") * 0.3).to(dtype)
    pw_b = torch.randn(D, device="cuda").to(dtype)
    args = (pixels, dw_w, dw_b, pw_w, pw_b, pos_embed, ids)
    out = cuda.dwsep_patch_embed(*args)
    expect = reference.dwsep_patch_embed(*(t.double() if t is not None and t.is_floating_point() else t for t in args))
    plain = reference.dwsep_patch_embed(*args)
    assert_close_to_reference(out, expect, plain, triton_dwsep(*args), "dwsep_patch_embed")


# ---------------------------------------------------------------- one small case per op (compute-sanitizer)

@GPU
@pytest.mark.parametrize("dtype", LOW)
def test_small_every_op(dtype):
    """Small shapes through every kernel, splits forced: what bench/gpu_check.sh runs under memcheck and racecheck."""
    check_int4(*make_int4(3, 40, 576, 64, False, dtype), split_k=3, what="int4 asym")
    check_int4(*make_int4(9, 40, 256, 128, True, dtype, bias=False), what="int4 sym")

    args, kwargs = paged_inputs([1, 17, 200], None, block_size=16, rotary_dim=64, device="cuda")
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
    out = nan_like(low[0])
    cuda.paged_attention(*low, **kwargs, out=out, split_size=64)
    expect = paged_reference(args, kwargs)
    assert error(out, expect) <= 2 * paged_pytorch_error(args, kwargs, dtype, expect) + 1e-6

    k, v = (torch.randn(5, 3, 64, device="cuda").to(dtype) for _ in range(2))
    rope = {"cos_sin": reference.rope_table(64, 300, 10000.0, device="cuda"),
            "positions": torch.randint(0, 300, (5,), dtype=torch.int32, device="cuda")}
    check_write_kv_cache(k, v, make_slots(5, 4, 16, "cuda"), (4, 16, 3, 64), rope, "write_kv_cache")

    q, kk, vv, lens = cross_inputs(2, 1, 700, 9, 3, 64, [700, 9], device="cuda")
    ql, kl, vl = (t.to(dtype) for t in (q, kk, vv))
    out = nan_like(ql)
    cuda.cross_attention(ql, kl, vl, kv_lens=lens, out=out, split_size=128)
    plain = reference.cross_attention(ql, kl, vl, kv_lens=lens)
    assert_close_to_reference(out, cross_reference(q, kk, vv, lens), plain)

    pixels, pos_embed, ids = patch_case(1, 3, 32, 48, 16, 40, "ids", dtype)
    weight = (torch.randn(40, 3, 16, 16, device="cuda") * 0.05).to(dtype)
    out = cuda.patch_embed(pixels, weight, None, pos_embed, ids)
    expect = reference.patch_embed(pixels.double(), weight.double(), None, pos_embed.double(), ids)
    assert_close_to_reference(out, expect, reference.patch_embed(pixels, weight, None, pos_embed, ids))
    dw = [(torch.randn(*s, device="cuda") * 0.1).to(dtype) for s in ((3, 1, 16, 16), (3,), (40, 3), (40,))]
    out = cuda.dwsep_patch_embed(pixels, *dw, pos_embed, ids)
    expect = reference.dwsep_patch_embed(pixels.double(), *(t.double() for t in dw), pos_embed.double(), ids)
    assert_close_to_reference(out, expect, reference.dwsep_patch_embed(pixels, *dw, pos_embed, ids))
