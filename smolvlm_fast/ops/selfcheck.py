"""The first-use self-check (ops/registry.py runs it): the first call of each (op, implementation, shape class) on a
GPU also runs the PyTorch reference on the call's own inputs and compares, within the op's tolerance below; a wrong
result or a kernel that fails to run (an architecture or driver error, a launch failure) disables that implementation
for that op for the process, and the call goes down the kernel order.

SMOLVLM_FAST_SELF_CHECK: unset or 1 (on for calls on a CUDA device), 0 (off), all (every call, also the CPU tensors
the Triton interpreter runs in the tests). The check costs one run of the reference in the call's precision and one
in float64 per shape class and process; it never runs while a CUDA graph is being captured.

Importing this module needs no torch (the registry imports it); its functions import torch when they run.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

MODE_ENV = "SMOLVLM_FAST_SELF_CHECK"
MODES = {"": "gpu", "1": "gpu", "on": "gpu", "gpu": "gpu", "0": "off", "off": "off", "all": "all"}
SMALL_ROWS = 16  # a first dimension up to this is decode-sized: its own shape class (the kernels' decode paths)


@dataclass(frozen=True)
class Tolerance:
    """Pass when max |out - exact| <= factor * max |plain - exact| + floor * max |exact|, with exact the reference
    in float64 and plain the reference in the call's own precision (FlashAttention's rule, as the tests hold the
    kernels to it; ops/README.md "How an implementation is checked")."""
    factor: float
    floor: dict[str, float]  # per output dtype: the rounding a kernel may add on top (relative to max |exact|)
    tests: str               # where the rule comes from


# float32: 1e-5 relative (the project's float32 contract); float16 / bfloat16: one rounding of the largest output (half an ulp, 2^-11 and
# 2^-8 relative) on top of twice the plain op's error, so that an op the plain reference computes exactly (a copy,
# a sum that rounds the same way) is not held to zero
FLOORS = {"float32": 1e-5, "float16": 2.0**-11, "bfloat16": 2.0**-8, "float64": 1e-12}
TOLERANCES = {
    "rms_norm": Tolerance(2.0, FLOORS, "tests/test_kernels_small_ops.py"),
    "layer_norm": Tolerance(2.0, FLOORS, "tests/test_kernels_small_ops.py"),
    "silu_and_mul": Tolerance(2.0, FLOORS, "tests/test_kernels_small_ops.py"),
    "gelu_tanh": Tolerance(2.0, FLOORS, "tests/test_kernels_small_ops.py"),
    "patch_embed": Tolerance(2.0, FLOORS, "tests/test_kernel_patch_embed.py, tests/test_cuda_kernels.py"),
    "dwsep_patch_embed": Tolerance(2.0, FLOORS, "tests/test_kernel_patch_embed.py, tests/test_cuda_kernels.py"),
    "rope_attention": Tolerance(2.0, FLOORS, "tests/test_kernel_rope_attention.py"),
    "write_kv_cache": Tolerance(2.0, FLOORS, "tests/test_kernel_write_kv_cache.py (v: a copy, plain error 0)"),
    "paged_attention": Tolerance(2.0, FLOORS, "tests/test_kernel_paged_attention.py, tests/test_cuda_kernels.py"),
    "cross_attention": Tolerance(2.0, FLOORS, "tests/test_kernel_cross_attention.py, tests/test_cuda_kernels.py"),
    "int4_gemm": Tolerance(2.0, FLOORS, "tests/test_kernel_int4_gemm.py, tests/test_cuda_kernels.py"),
}
CACHE_ARGS = {"paged_attention": (1, 2)}  # read in their own dtype: the reference widens what it gathers


def mode() -> str:
    """"gpu" (the default), "off" or "all", from SMOLVLM_FAST_SELF_CHECK."""
    value = os.environ.get(MODE_ENV, "").strip().lower()
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: use 1 (check on CUDA devices, the default), 0 (off) or all")
    return MODES[value]


def capturing(first_arg) -> bool:
    """A CUDA graph is being captured on the current stream: no check (it would synchronize)."""
    if not getattr(first_arg, "is_cuda", False):
        return False
    import torch
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def wanted(first_arg) -> bool:
    """Whether a first call with this first argument gets the check."""
    chosen = mode()
    if chosen == "off" or capturing(first_arg):
        return False
    return chosen == "all" or getattr(first_arg, "is_cuda", False)


def _kind(a):
    shape = getattr(a, "shape", None)
    if shape is not None and hasattr(a, "dtype"):
        return a.dtype, len(shape), shape[-1] if shape and getattr(a.dtype, "is_floating_point", False) else None
    if hasattr(a, "group_size"):  # an int4 weight
        return "int4", a.group_size, bool(a.symmetric)
    return type(a).__name__


def shape_class(args: tuple, kwargs: dict) -> tuple:
    """What a first use stands for: each argument's dtype, rank and (floating) last dimension, which keywords are
    given, the first argument's device and whether it is decode-sized (<= SMALL_ROWS rows)."""
    first = args[0]
    small = bool(getattr(first, "shape", None)) and first.shape[0] <= SMALL_ROWS
    return (getattr(first, "is_cuda", False), small, *map(_kind, args),
            *((k, _kind(v)) for k, v in kwargs.items() if v is not None))


def kernel_failure(e: Exception) -> bool:
    """A kernel that could not run (launch, architecture, driver, compiler errors), as opposed to the caller's bad
    arguments (ValueError, TypeError) or memory running out, which the call raises as before."""
    return not isinstance(e, (ValueError, TypeError, MemoryError)) and "OutOfMemory" not in type(e).__name__


def check(name: str, fn, reference, args: tuple, kwargs: dict) -> tuple[object, str | None]:
    """(fn's result, None) when fn(*args, **kwargs) matches the reference, else (its result or None, what failed)."""
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  sorted by kernel_failure: a failed launch is a finding, not an error
        if not kernel_failure(e):
            raise
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
    err, limit = error(name, out, reference, args, kwargs)
    if err <= limit:  # NaN fails
        return out, None
    return out, f"max error {err:.3g} against the reference, over its limit {limit:.3g}"


def error(name: str, out, reference, args: tuple, kwargs: dict) -> tuple[float, float]:
    """(max |out - exact|, the op's limit) for an implementation's result `out` of the call (args, kwargs)."""
    import torch

    kwargs = {k: v for k, v in kwargs.items() if k in inspect.signature(reference).parameters}
    with torch.no_grad():
        if name == "write_kv_cache":
            return _written_error(reference, args, kwargs)
        plain = reference(*args, **kwargs)
        exact = reference(*_widened(args, CACHE_ARGS.get(name, ())), **_widened_kw(kwargs))
        return _max_error(out, exact), _limit(name, plain, exact)


def _limit(name: str, plain, exact) -> float:
    tolerance = TOLERANCES[name]
    dtype = str(_tensors(plain)[0].dtype).replace("torch.", "") if _tensors(plain) else "float32"
    return tolerance.factor * _max_error(plain, exact) + tolerance.floor.get(dtype, 1e-5) * _max_abs(exact)


def _widened(args, keep=()) -> list:
    return [a if i in keep else _wide(a) for i, a in enumerate(args)]


def _widened_kw(kwargs: dict) -> dict:
    return {k: _wide(v) for k, v in kwargs.items()}


def _wide(a):
    return a.double() if getattr(a, "is_floating_point", lambda: False)() else a


def _tensors(x) -> list:
    return [t for t in (x if isinstance(x, tuple) else (x,)) if hasattr(t, "shape")]


def _max_error(out, exact) -> float:
    got, want = _tensors(out), _tensors(exact)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    errors = [(g.double() - w.double()).abs().max().item() for g, w in zip(got, want) if w.numel()]
    return max(errors, default=0.0)


def _max_abs(x) -> float:
    return max((t.double().abs().max().item() for t in _tensors(x) if t.numel()), default=0.0)


def _written_error(reference, args: tuple, kwargs: dict) -> tuple[float, float]:
    """write_kv_cache writes in place: the rows it wrote (slots in the cache, each written once) against the
    reference writing the same tokens into a compact cache of one slot per token, in the call's precision and in
    float64. Repeated slots (which token wins is not in the contract) are not compared."""
    import torch

    k, v, k_cache, v_cache, slot_mapping = args[:5]
    slots = slot_mapping.long()
    keep = (slots >= 0) & (slots < k_cache.shape[0] * k_cache.shape[1])
    if int(keep.sum()) != slots[keep].unique().numel():
        return 0.0, 0.0
    compact = torch.where(keep, torch.arange(len(slots), device=slots.device), -1)
    got = [c.flatten(0, 1)[slots[keep]] for c in (k_cache, v_cache)]  # [written, Hkv, Dh] each
    plain, exact = (_compact_write(reference, k, v, compact, kwargs, dtype) for dtype in (k_cache.dtype, None))
    keep_rows = [(t[keep] for t in pair) for pair in (plain, exact)]
    plain, exact = (tuple(rows) for rows in keep_rows)
    return _max_error(tuple(got), exact), _limit("write_kv_cache", plain, exact)


def _compact_write(reference, k, v, compact, kwargs: dict, dtype) -> tuple:
    """(k rows, v rows) [T, Hkv, Dh] as the reference writes them into a cache of dtype (None: float64 inputs)."""
    import torch

    if dtype is None:
        k, v, kwargs, dtype = k.double(), v.double(), _widened_kw(kwargs), torch.float64
    caches = [torch.zeros(len(compact), 1, *k.shape[1:], dtype=dtype, device=k.device) for _ in range(2)]
    reference(k, v, *caches, compact, **kwargs)
    return caches[0][:, 0], caches[1][:, 0]
