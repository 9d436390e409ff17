"""The CUDA kernels of csrc/cuda/ executed on the CPU: the same .cu files compiled with g++ under the emulator of
csrc/cuda/emu/ (one OS thread per CUDA thread, real barriers for __syncthreads and the warp collectives, the
m16n8k16 MMA with the PTX fragment layout), so their indexing, synchronisation and arithmetic are tested without a
GPU. What the emulator cannot show (timing, bank conflicts, register and shared-memory limits beyond 48 KB, occupancy,
asynchrony): csrc/cuda/README.md.

The emulated module is smolvlm_fast._C itself (bindings.cpp and every entry point, argument checks included), called
through smolvlm_fast/ops/cuda.py's launchers (the layouts, workspaces and split choices the GPU path uses) with only
their device plumbing replaced (`emulated` below). Each result is held against the float64 reference of
smolvlm_fast/ops/reference.py under test_cuda_kernels.py's rule (twice the plain PyTorch op's error in fp16 / bf16,
1e-5 relative in fp32), outputs NaN before the call. Then the emulator's own checks: the standalone driver
(csrc/cuda/emu/driver.cpp) under AddressSanitizer and ThreadSanitizer, and two planted bugs that must be caught.
"""
from __future__ import annotations

import math
import os
import subprocess

import numpy as np
import pytest
import torch

from smolvlm_fast.formats import int4 as int4_format
from smolvlm_fast.models.int4_linear import Int4Tensors
from smolvlm_fast.ops import cuda, reference

from . import cuda_emu_build
from .test_cuda_kernels import (
    assert_close_to_reference,
    error,
    int4_expected,
    int4_plain,
    nan_like,
)
from .test_kernel_cross_attention import make_inputs as cross_inputs
from .test_kernel_cross_attention import reference_f64 as cross_reference
from .test_kernel_paged_attention import make_inputs as paged_inputs
from .test_kernel_paged_attention import pytorch_error as paged_pytorch_error
from .test_kernel_paged_attention import reference_f64 as paged_reference
from .test_kernel_write_kv_cache import make_slots, nan_cache

pytestmark = pytest.mark.skipif(cuda_emu_build.compiler() is None, reason="no C++ compiler (g++) for the emulator")
LOW = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ALL = [pytest.param(torch.float32, id="fp32"), *LOW]
RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)


@pytest.fixture(scope="module")
def emu_module():
    return cuda_emu_build.module()


@pytest.fixture
def emulated(emu_module, monkeypatch):
    """ops.cuda's launchers on CPU tensors, calling the emulated _C: no device check, device 0, the null stream and
    a 4-SM GPU for the split heuristics."""
    monkeypatch.setattr(cuda, "_C", emu_module)
    monkeypatch.setattr(cuda, "_require_cuda", lambda op, *tensors: None)
    monkeypatch.setattr(cuda, "_device", lambda t: 0)
    monkeypatch.setattr(cuda, "_stream", lambda t: 0)
    monkeypatch.setattr(cuda, "_num_sms", lambda device: 4)
    return cuda.LAUNCH


def test_the_emulator_builds_what_setup_builds():
    from .test_cuda_build import SETUP

    assert {p.split("/")[-1] for p in SETUP.CUDA_SOURCES} == {"bindings.cpp", *cuda_emu_build.KERNEL_SOURCES}


def test_entry_points_check_their_arguments(emulated, emu_module):
    """The argument checks are the GPU build's: a bad call is a ValueError before anything runs."""
    with pytest.raises(ValueError, match="1 to 16 rows"):
        emu_module.int4_gemm(16, 16, 16, 16, 0, 0, 0, 17, 64, 64, 32, 64, 64, 32, 2, 1, 0, 1, 0, 0)
    assert emu_module.device_count() == 0 and emu_module.compute_capability(0) == ""


# ---------------------------------------------------------------- int4_gemm

def make_int4(M, N, K, group_size, symmetric, dtype, bias=True, row_pad=0):
    """x [M, K] (a column slice of a wider tensor when row_pad: padded row stride), an Int4 weight, a bias."""
    w = RNG.standard_normal((N, K), dtype=np.float32) * RNG.uniform(0.01, 0.1, (N, 1)).astype(np.float32)
    weight = Int4Tensors.from_numpy(int4_format.quantize_int4(w, group_size=group_size, symmetric=symmetric))
    x = torch.randn(M, K + row_pad).to(dtype)[:, :K]
    b = torch.randn(N).to(dtype) if bias else None
    return x, weight, b


def check_int4(launch, x, w, b, split_k, what):
    out = nan_like(torch.empty(x.shape[0], w.N + 8, dtype=x.dtype))[:, :w.N]  # padded output rows too
    assert launch["int4_gemm"](x, w, b, out=out, split_k=split_k) is out
    assert_close_to_reference(out, int4_expected(x, w, b), int4_plain(x, w, b), what=what)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("M, N, K, group_size, split_k", [
    (1, 72, 256, 128, 1), (2, 40, 192, 64, 2), (7, 64, 128, 32, 3), (8, 72, 160, 32, 5), (9, 40, 256, 64, 4),
    (16, 65, 128, 128, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_int4_gemm(emulated, dtype, M, N, K, group_size, split_k, symmetric):
    """M 1..16 (one or two MMA column tiles), N ending mid-tile, splits of K that end mid-step of 4 blocks."""
    x, w, b = make_int4(M, N, K, group_size, symmetric, dtype, bias=M % 2 == 1, row_pad=8 * (M % 3))
    check_int4(emulated, x, w, b, split_k, f"M={M} N={N} K={K} g{group_size} split{split_k}")


def test_int4_gemm_more_than_one_chunk_of_x(emulated):
    """K = 1152 = 36 blocks: two staged chunks of x (32 blocks, then 4)."""
    check_int4(emulated, *make_int4(3, 16, 1152, 64, False, torch.bfloat16), split_k=1, what="K=1152")


# ---------------------------------------------------------------- paged_attention

@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("seq_lens, heads, head_dim, rotary_dim, block_size, split_size", [
    ([1, 17, 40], (9, 3), 64, 64, 16, 16), ([0, 33], (15, 5), 80, 40, 32, 512), ([20, 5], (16, 2), 96, None, 8, 8),
    ([3, 50], (4, 4), 128, 64, 16, 32)], ids=lambda v: str(v))
@pytest.mark.parametrize("varlen", [False, True], ids=["decode", "varlen"])
def test_paged_attention(emulated, seed, dtype, seq_lens, heads, head_dim, rotary_dim, block_size, split_size, varlen):
    """GQA 9/3 and 15/5 (partial rotary), 8 query heads per KV head (two head slices), MHA at d128; contexts of one
    token, mid-block, on a block edge and empty (zeros); several context splits (the combine kernel) and one."""
    args, kwargs = paged_inputs([max(n, 1) for n in seq_lens], None, heads=heads, head_dim=head_dim,
                                block_size=block_size, rotary_dim=rotary_dim, seed=seed)
    args[4][torch.tensor(seq_lens) == 0] = 0  # an empty context (the builder wants one token at least)
    if varlen:
        kwargs["query_start_loc"] = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    expect = paged_reference(args, kwargs)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
    out = nan_like(low[0])
    assert emulated["paged_attention"](*low, **kwargs, out=out, split_size=split_size) is out
    assert not out.isnan().any(), f"{int(out.isnan().sum())} NaN outputs (unwritten, or a poisoned input read)"
    err = error(out, expect)
    plain = paged_pytorch_error(args, kwargs, dtype, expect) if dtype != torch.float32 else 0.0
    limit = 1e-5 * expect.abs().max().item() if dtype == torch.float32 else low_precision_limit(plain, expect, dtype)
    assert err <= limit, f"{dtype} error {err:.3g} > {limit:.3g}"


def low_precision_limit(plain: float, expect: torch.Tensor, dtype) -> float:
    """Twice the plain PyTorch op's error, plus the output's own rounding (half a unit in the last place of the
    largest output): both round every output once to dtype, and the plain op's largest error may fall where its
    rounding happened to be small, so doubling it does not cover the kernel's rounding on top of its arithmetic
    (seed 3874289526 of the 15/5-head, d80 fp16 decode case: 0.00142 against 2 x 0.00070)."""
    half_ulp = torch.finfo(dtype).eps / 2 * 2.0 ** math.floor(math.log2(expect.abs().max().item() or 1.0))
    return 2 * plain + half_ulp + 1e-6


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("max_seq_len, split_size", [(20, 16), (0, 32), (100, None)], ids=str)
def test_paged_attention_reads_every_key_past_max_seq_len(emulated, seed, dtype, max_seq_len, split_size):
    """max_seq_len below the longest sequence (160 keys) sizes the grid too small: the last split then reads the
    rest a split_size chunk at a time (an online softmax across its chunks), so no key is dropped."""
    args, kwargs = paged_inputs([17, 160, 40], None, heads=(9, 3), head_dim=64, block_size=16, rotary_dim=64,
                                seed=seed)
    expect = paged_reference(args, kwargs)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
    out = nan_like(low[0])
    emulated["paged_attention"](*low, **kwargs, out=out, max_seq_len=max_seq_len, split_size=split_size)
    assert not out.isnan().any()
    plain = paged_pytorch_error(args, kwargs, dtype, expect) if dtype != torch.float32 else 0.0
    limit = 1e-5 * expect.abs().max().item() if dtype == torch.float32 else low_precision_limit(plain, expect, dtype)
    assert error(out, expect) <= limit, f"{dtype}: max_seq_len {max_seq_len} dropped keys"


# ---------------------------------------------------------------- cross_attention

@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("B, S, T, Hq, Hkv, Dh, kv_lens, split_size", [
    (3, 1, 40, 9, 3, 64, [40, 0, 17], 16), (2, 2, 30, 15, 5, 80, [30, 1], None), (1, 3, 20, 2, 2, 128, None, 8)],
    ids=lambda v: str(v))
def test_cross_attention(emulated, seed, dtype, B, S, T, Hq, Hkv, Dh, kv_lens, split_size):
    """GQA 9/3 with an empty image row (zeros) and 15/5 at d80, several text queries per row, splits of the image."""
    q, k, v, lens = cross_inputs(B, S, T, Hq, Hkv, Dh, kv_lens, seed=seed)
    expect = cross_reference(q, k, v, lens)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    out = nan_like(ql)
    assert emulated["cross_attention"](ql, kl, vl, kv_lens=lens, out=out, split_size=split_size) is out
    assert_close_to_reference(out, expect, reference.cross_attention(ql, kl, vl, kv_lens=lens), what="cross")
    if kv_lens is not None and 0 in kv_lens:
        assert (out[lens == 0] == 0).all()


# ---------------------------------------------------------------- write_kv_cache

@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("heads, head_dim, rotary", [(3, 64, "full"), (2, 80, "half"), (1, 128, "none")],
                         ids=lambda v: str(v))
def test_write_kv_cache(emulated, dtype, heads, head_dim, rotary):
    """16-byte moves (d64, d128) and element moves (d80, half rotary: R/2 = 20); slots -1 and past the cache are
    skipped; every slot not written stays NaN."""
    T, block_size, num_blocks = 7, 16, 3
    shape = (num_blocks, block_size, heads, head_dim)
    k, v = (torch.randn(T, heads, head_dim).to(dtype) for _ in range(2))
    slots = make_slots(T - 1, num_blocks, block_size, "cpu")
    slots = torch.cat([slots, torch.tensor([num_blocks * block_size + 5], dtype=slots.dtype)])  # out of range
    rope = {}
    if rotary != "none":
        rotary_dim = head_dim if rotary == "full" else head_dim // 2
        rope = {"cos_sin": reference.rope_table(rotary_dim, 64, 10000.0), "rotary_dim": rotary_dim,
                "positions": torch.randint(0, 64, (T,), dtype=torch.int64)}
    ours = nan_cache(*shape, dtype, "cpu"), nan_cache(*shape, dtype, "cpu")
    plain = nan_cache(*shape, dtype, "cpu"), nan_cache(*shape, dtype, "cpu")
    exact = nan_cache(*shape, torch.float64, "cpu"), nan_cache(*shape, torch.float64, "cpu")
    emulated["write_kv_cache"](k, v, *ours, slots, **rope)
    in_range = slots[(slots >= 0) & (slots < num_blocks * block_size)]
    reference.write_kv_cache(k, v, *plain, in_range_only(slots, num_blocks * block_size), **rope)
    reference.write_kv_cache(k.double(), v.double(), *exact, in_range_only(slots, num_blocks * block_size), **rope)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[in_range.long()] = True
    for cache in ours:
        assert cache.flatten(0, 1)[~written].isnan().all(), "a slot not in slot_mapping changed"
        assert torch.isfinite(cache.flatten(0, 1)[written]).all(), "a written slot was left (partly) NaN"
    assert torch.equal(ours[1].flatten(0, 1)[written], plain[1].flatten(0, 1)[written]), "v is a copy"
    k_ours, k_plain, k_exact = (c[0].flatten(0, 1)[written] for c in (ours, plain, exact))
    if rope:
        assert_close_to_reference(k_ours, k_exact, k_plain, what=f"k {rotary}")
    else:
        assert torch.equal(k_ours, k_plain)


def in_range_only(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The slots the kernel writes, -1 for the others (the reference skips -1 only)."""
    return torch.where(slots < num_slots, slots, torch.full_like(slots, -1))


# ---------------------------------------------------------------- patch_embed / dwsep_patch_embed

def image(B, C, H, W, P, D, dtype, positions, channels_last=False):
    pixels = torch.randn(B, C, H, W).to(dtype)
    if channels_last:
        pixels = pixels.to(memory_format=torch.channels_last)
    N = (H // P) * (W // P)
    pos_embed = torch.randn(N + 3, D).to(dtype) if positions != "none" else None
    ids = torch.randint(0, N + 3, (B, N)) if positions == "ids" else None
    return pixels, pos_embed, ids


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("H, W, P, D, positions, channels_last", [
    (32, 48, 16, 40, "ids", False), (28, 42, 14, 72, "arange", False), (32, 32, 16, 64, "none", True)],
    ids=lambda v: str(v))
def test_patch_embed(emulated, dtype, H, W, P, D, positions, channels_last):
    """P = 16 takes 16-byte tile loads, P = 14 and channels_last pixels element loads; D = 40 and 72 end mid-tile."""
    pixels, pos_embed, ids = image(2, 3, H, W, P, D, dtype, positions, channels_last)
    weight = (torch.randn(D, 3, P, P) * 0.05).to(dtype)
    b = torch.randn(D).to(dtype) if positions != "arange" else None
    out = emulated["patch_embed"](pixels, weight, b, pos_embed, ids)
    expect = reference.patch_embed(pixels.double(), weight.double(), None if b is None else b.double(),
                                   None if pos_embed is None else pos_embed.double(), ids)
    assert_close_to_reference(out, expect, reference.patch_embed(pixels, weight, b, pos_embed, ids), what="patch")


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("C, D, P, H, W, positions", [(3, 40, 14, 28, 70, "ids"), (8, 24, 16, 32, 48, "none")],
                         ids=lambda v: str(v))
def test_dwsep_patch_embed(emulated, dtype, C, D, P, H, W, positions):
    """10 and 6 patches per image (a block of 16 partly empty), biases on both convolutions."""
    pixels, pos_embed, ids = image(2, C, H, W, P, D, dtype, positions)
    dw_w, dw_b = (torch.randn(C, 1, P, P) * 0.1).to(dtype), torch.randn(C).to(dtype)
    pw_w, pw_b = (torch.randn(D, C) * 0.3).to(dtype), torch.randn(D).to(dtype)
    args = (pixels, dw_w, dw_b, pw_w, pw_b, pos_embed, ids)
    out = emulated["dwsep_patch_embed"](*args)
    expect = reference.dwsep_patch_embed(*(t.double() if t is not None and t.is_floating_point() else t for t in args))
    assert_close_to_reference(out, expect, reference.dwsep_patch_embed(*args), what="dwsep")


# ---------------------------------------------------------------- sanitizers and planted bugs (the driver)

def run_driver(path, *cases, plant: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, SMOLVLM_EMU_PLANT=plant or "")
    return subprocess.run([str(path), *cases], capture_output=True, text=True, timeout=600, env=env,
                          check=False)


def sanitizer_works(flag: str) -> bool:
    """Whether g++ can link a -fsanitize=<flag> program here (its runtime library installed)."""
    probe = subprocess.run([cuda_emu_build.compiler(), f"-fsanitize={flag}", "-x", "c++", "-", "-o", "/dev/null"],
                           input="int main() { return 0; }", capture_output=True, text=True, check=False)
    return probe.returncode == 0


@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_every_kernel_is_clean_under_the_sanitizer(sanitizer):
    """Every entry point once (driver.cpp), under AddressSanitizer + UBSan (out-of-bounds reads and writes of the
    tensors and of shared memory, undefined behaviour) and under ThreadSanitizer (data races between CUDA threads:
    a missing __syncthreads or warp exchange), results checked too."""
    if not sanitizer_works(sanitizer):
        pytest.skip(f"g++ cannot link -fsanitize={sanitizer} here")
    done = run_driver(cuda_emu_build.driver(sanitizer))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-6000:]}"
    assert "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr[-6000:]
    assert done.stdout.count(": ok") == 6, done.stdout


def test_the_driver_checks_fail_on_a_swapped_mma_fragment():
    """Teeth: with A's registers a[1] and a[2] read the other way round by the emulated MMA, the MMA kernels' results
    are wrong and the checks say so (the same checks pass without the plant: the sanitizer tests)."""
    build = cuda_emu_build.driver("address" if sanitizer_works("address") else None)  # the sanitizer test's, cached
    done = run_driver(build, "int4", "patch", plant="swapped_fragment")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "int4_gemm: max error" in done.stdout and done.stdout.count("MISMATCH") == 2, done.stdout


def test_tsan_reports_a_dropped_syncthreads():
    """Teeth: with __syncthreads a no-op, ThreadSanitizer reports the attention kernel's races on shared memory."""
    if not sanitizer_works("thread"):
        pytest.skip("g++ cannot link -fsanitize=thread here")
    done = run_driver(cuda_emu_build.driver("thread"), "paged", plant="no_sync")
    assert done.returncode != 0 and "ThreadSanitizer: data race" in done.stderr, done.stderr[-3000:]

