"""The first-use self-check (ops/selfcheck.py, run by ops/registry.py), on the CPU: a planted wrong implementation,
one that raises, and one that is right, through the registry's test hook (registry.stand_in); a CPU tensor that says
it is on CUDA stands for a GPU call. Also ops/cuda.py's build check (arch_mismatch) and SMOLVLM_FAST_CUDA_SYNC's
host-side bounds checks."""
import threading
import warnings

import pytest
import torch

from smolvlm_fast import ops
from smolvlm_fast.ops import cuda, reference, registry, selfcheck
from smolvlm_fast.ops.registry import Impl, KernelWarning, any_call

from .test_cuda_kernels import cuda_like


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    for name in (registry.KERNELS_ENV, selfcheck.MODE_ENV, cuda.SYNC_ENV):
        monkeypatch.delenv(name, raising=False)
    registry.use_kernels(None)
    registry.reset_first_use()
    yield
    registry.use_kernels(None)
    registry.reset_first_use()


def planted(fn, name="triton", device="cuda") -> Impl:
    return Impl(name, ops.ORDER.index(name), device, fn, any_call)


def off_by_a_percent(x, weight, eps, residual=None):
    out = reference.rms_norm(x, weight, eps, residual)
    return (out[0] * 1.01, out[1]) if residual is not None else out * 1.01


def fails_to_launch(*args, **kwargs):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def counted(fn, calls: list):
    def call(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return fn(*args, **kwargs)
    return call


def rms_inputs():
    return cuda_like(torch.randn(5, 96)), torch.randn(96), 1e-6


@pytest.mark.parametrize("bad", [off_by_a_percent, fails_to_launch], ids=["wrong", "raises"])
def test_a_failing_kernel_warns_once_falls_back_and_stays_disabled(bad):
    calls = []
    with registry.stand_in("rms_norm", planted(counted(bad, calls))):
        x, w, eps = rms_inputs()
        with pytest.warns(KernelWarning, match=r"ops\.rms_norm: the triton implementation failed") as record:
            out = ops.rms_norm(x, w, eps)
        assert len(record) == 1 and ("max error" in str(record[0].message)) == (bad is off_by_a_percent)
        torch.testing.assert_close(out, reference.rms_norm(x, w, eps), rtol=0, atol=0)  # the call's result: correct
        assert registry.disabled("rms_norm", "triton") and len(calls) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            x2, w2, _ = rms_inputs()
            torch.testing.assert_close(ops.rms_norm(x2, w2, eps), reference.rms_norm(x2, w2, eps), rtol=0, atol=0)
        assert len(calls) == 1  # never called again
        assert registry.pick("rms_norm", None, (x, w, eps), {}).name == "reference"
        assert "disabled (" in ops.explain("rms_norm", x, w, eps)
        assert registry.disabled("layer_norm", "triton") is None  # other ops untouched


def test_a_right_kernel_is_checked_once_per_shape_class():
    calls, checks = [], []
    real_check = selfcheck.check

    def spy(*args, **kwargs):
        checks.append(args[0])
        return real_check(*args, **kwargs)

    with registry.stand_in("rms_norm", planted(counted(reference.rms_norm, calls))), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(selfcheck, "check", spy)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                ops.rms_norm(*rms_inputs())
            ops.rms_norm(cuda_like(torch.randn(40, 96)), torch.randn(96), 1e-6)  # not decode-sized: a new class
            ops.rms_norm(cuda_like(torch.randn(3, 64)), torch.randn(64), 1e-6)   # another width
        assert checks == ["rms_norm"] * 3 and len(calls) == 5
        assert not registry.disabled("rms_norm", "triton")


def test_a_broken_cuda_kernel_falls_back_to_the_next_in_the_order():
    """CUDA fails, Triton (right) takes the call and later ones; the order is the process's."""
    triton_calls = []
    with registry.stand_in("rms_norm", planted(counted(reference.rms_norm, triton_calls))), \
            registry.stand_in("rms_norm", planted(off_by_a_percent, "cuda")), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda, "unusable", lambda device=None: None)
        x, w, eps = rms_inputs()
        with pytest.warns(KernelWarning, match="calls go to triton instead"):
            out = ops.rms_norm(x, w, eps)
        torch.testing.assert_close(out, reference.rms_norm(x, w, eps), rtol=0, atol=0)
        assert triton_calls and registry.pick("rms_norm", None, (x, w, eps), {}).name == "triton"


def test_a_cuda_build_that_cannot_run_here_falls_back_with_one_warning(monkeypatch):
    calls = []
    with registry.stand_in("rms_norm", planted(counted(reference.rms_norm, calls), "cuda")):
        monkeypatch.setattr(cuda, "unusable", lambda device=None: "no kernel image is available (built for sm_90)")
        monkeypatch.setenv(selfcheck.MODE_ENV, "0")  # not the self-check: the build check runs regardless
        x, w, eps = rms_inputs()
        with pytest.warns(KernelWarning, match="no kernel image"):
            ops.rms_norm(x, w, eps)
        assert calls == [] and registry.disabled("rms_norm", "cuda")


def test_off_and_off_the_gpu_nothing_is_checked(monkeypatch):
    calls = []
    with registry.stand_in("rms_norm", planted(counted(off_by_a_percent, calls), device=None)):
        x, w, eps = torch.randn(5, 96), torch.randn(96), 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops.rms_norm(x, w, eps)  # a CPU tensor (the Triton interpreter's case): not checked by default
            monkeypatch.setenv(selfcheck.MODE_ENV, "0")
            ops.rms_norm(*rms_inputs())  # a GPU call with the check off
        assert len(calls) == 2
        registry.reset_first_use()
        monkeypatch.setenv(selfcheck.MODE_ENV, "all")
        with pytest.warns(KernelWarning):
            ops.rms_norm(x, w, eps)  # asked for: the CPU call is checked too
        monkeypatch.setenv(selfcheck.MODE_ENV, "sometimes")
        with pytest.raises(ValueError, match="SMOLVLM_FAST_SELF_CHECK='sometimes'"):
            selfcheck.mode()


def test_the_caller_s_errors_are_not_kernel_failures():
    def refuses(*args, **kwargs):
        raise ValueError("ops.rms_norm: bad weight")

    with registry.stand_in("rms_norm", planted(refuses)):
        with pytest.raises(ValueError, match="bad weight"):
            ops.rms_norm(*rms_inputs())
        assert not registry.disabled("rms_norm", "triton")


def test_write_kv_cache_is_checked_on_the_slots_it_writes():
    """In place: the written rows against the reference's; a kernel that drops the rotation is caught, the caches
    end up as the reference writes them, and unwritten slots are left alone."""
    def no_rope(k, v, k_cache, v_cache, slot_mapping, *, cos_sin=None, positions=None, rotary_dim=None):
        reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)

    T, H, D, blocks, size = 7, 3, 64, 4, 4
    k, v = torch.randn(T, H, D), torch.randn(T, H, D)
    slots = torch.randperm(blocks * size)[:T].int()
    slots[2] = -1
    cos_sin, positions = ops.rope_table(D, 32, 10000.0), torch.randint(1, 32, (T,))
    caches = [torch.full((blocks, size, H, D), float("nan")).as_subclass(type(cuda_like(k))) for _ in range(2)]
    expect = [torch.full((blocks, size, H, D), float("nan")) for _ in range(2)]
    reference.write_kv_cache(k, v, *expect, slots, cos_sin=cos_sin, positions=positions)
    registry.use_kernels("triton")  # past the CUDA kernel, which would launch
    with registry.stand_in("write_kv_cache", planted(no_rope)), \
            pytest.warns(KernelWarning, match="write_kv_cache: the triton implementation failed"):
        ops.write_kv_cache(cuda_like(k), v, *caches, slots, cos_sin=cos_sin, positions=positions)
    for got, want in zip(caches, expect):
        torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=0, atol=0, equal_nan=True)


def test_the_tolerance_table_covers_every_op_and_passes_the_reference_itself():
    assert set(selfcheck.TOLERANCES) == set(ops.OPS)
    x, w = torch.randn(6, 80).bfloat16(), torch.randn(80).bfloat16()
    for dtype_input in (x, x.float(), x.half()):
        out = reference.rms_norm(dtype_input, w.to(dtype_input.dtype), 1e-6)
        err, limit = selfcheck.error("rms_norm", out, reference.rms_norm, (dtype_input, w.to(dtype_input.dtype), 1e-6),
                                     {})
        assert err <= limit and limit > 0


@pytest.mark.parametrize("archs, capability, runs", [
    ("sm_80", "8.0", True), ("sm_80", "8.6", True), ("sm_80", "9.0", True),  # SASS on 8.x, PTX JIT above
    ("sm_86", "8.0", False), ("sm_80;sm_90", "7.5", False), ("sm_90", "8.9", False), ("sm_89;sm_90", "8.9", True),
    ("sm_90;sm_100", "12.0", True), ("weird", "8.0", True), ("sm_80", "", True)])
def test_arch_mismatch(archs, capability, runs):
    problem = cuda.arch_mismatch(archs, capability)
    assert (problem is None) == runs, problem
    if not runs:
        assert "no kernel image" in problem and capability in problem and archs in problem


def paged_call(block_tables, seq_lens, positions, qsl=None):
    q, cache = torch.randn(2, 4, 64), torch.randn(3, 4, 2, 64)
    return (q, cache, cache, torch.tensor(block_tables), torch.tensor(seq_lens)), {
        "cos_sin": torch.randn(10, 64), "positions": torch.tensor(positions), "query_start_loc": qsl}


@pytest.mark.parametrize("block_tables, seq_lens, positions, message", [
    ([[0, 1], [2, 0]], [5, 3], [4, 2], None),
    ([[0, 3], [2, 0]], [5, 3], [4, 2], r"block_tables\[0\]\[1\] = 3 is outside \[0, 3\)"),
    ([[0, 1], [2, 0]], [9, 3], [4, 2], r"seq_lens\[0\] = 9"),
    ([[0, 1], [2, 0]], [5, 3], [4, 10], r"positions\[1\] = 10"),
    ([[0, 1], [2, 0]], [5, 3], [-1, 2], r"positions\[0\] = -1")])
def test_sync_mode_bounds_checks_paged_attention(block_tables, seq_lens, positions, message):
    args, kwargs = paged_call(block_tables, seq_lens, positions)
    if message is None:
        cuda.check_indices("paged_attention", *args, **kwargs)
    else:
        with pytest.raises(ValueError, match=message):
            cuda.check_indices("paged_attention", *args, **kwargs)


def test_sync_mode_checks_before_the_launch(monkeypatch):
    k, cache = torch.randn(3, 2, 64), torch.randn(2, 4, 2, 64)
    bad = torch.tensor([0, 8, -1], dtype=torch.int32)  # 8 slots: 0..7
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 8 is outside \[-1, 8\)"):
        cuda.check_indices("write_kv_cache", k, k, cache, cache, bad)
    monkeypatch.setenv(cuda.SYNC_ENV, "1")
    with pytest.raises(ValueError, match="slot_mapping"):
        cuda.LAUNCH["write_kv_cache"](k, k, cache, cache, bad)  # refused on the host, never launched
    with pytest.raises(ValueError, match="query_start_loc"):
        args, kwargs = paged_call([[0, 1], [2, 0]], [5, 3], [4, 2], qsl=torch.tensor([0, 3, 2]))
        cuda.check_indices("paged_attention", *args, **kwargs)
