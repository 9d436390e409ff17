"""Which implementation runs an op call, and why: the one place that decides (ops/README.md has the contracts).

Every implementation of an op is an `Impl`: a rank (its place in ORDER), the device its kernels run on, the function,
and `covers(*args, **kwargs)`, a predicate saying whether the function takes this call (dtypes, shapes, layouts). The
implementations say what they cover where their code is: ops/cuda.py's COVERS mirrors the CUDA kernels' limits, a
Triton module of kernels/ may hold a COVERS of its own (without one its kernels take any call on a CUDA device), and
the PyTorch reference takes everything. `pick` walks ORDER and takes the first implementation on the call's device
that covers it, so the reference (last, any device) always ends the walk.

Forcing one (`impl=` for a call, `prefer()` for a block of code): on its device a forced implementation runs the
calls it covers and hands the rest down the order (so `impl="cuda"` always gives the contract's result); off its
device it runs anyway and speaks for itself (the CUDA wrappers refuse CPU tensors with a clear error; the Triton
kernels run CPU tensors in Triton's interpreter, which the tests use).

Nothing here imports torch: the table is built on first use, and importing smolvlm_fast.ops stays PyTorch-free.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

OPS = ("rms_norm", "layer_norm", "silu_and_mul", "gelu_tanh", "patch_embed", "dwsep_patch_embed", "rope_attention",
       "write_kv_cache", "paged_attention", "cross_attention", "int4_gemm")
ORDER = ("cuda", "triton", "reference")  # tried in this order: the rank of an implementation is its index here
# op -> the module of kernels/ that implements it in Triton
TRITON_MODULES = {"rms_norm": "rms_norm", "layer_norm": "layer_norm", "silu_and_mul": "activations",
                  "gelu_tanh": "activations", "write_kv_cache": "write_kv_cache", "rope_attention": "rope_attention",
                  "paged_attention": "paged_attention", "cross_attention": "cross_attention",
                  "int4_gemm": "int4_gemm", "patch_embed": "patch_embed", "dwsep_patch_embed": "patch_embed"}
_preferred: contextvars.ContextVar[str | None] = contextvars.ContextVar("smolvlm_fast_ops_preferred", default=None)


@dataclass(frozen=True)
class Impl:
    name: str                # "cuda" | "triton" | "reference"
    rank: int                # ORDER.index(name): lower is tried first
    device: str | None       # the device type its kernels run on; None: any device
    fn: Callable             # called with the op's arguments once covers() has accepted them
    covers: Callable[..., bool]

    @property
    def scope(self) -> str:
        """What it covers, in words: the first paragraph of its covers predicate's docstring."""
        return " ".join((self.covers.__doc__ or "").split("\n\n")[0].split())


def any_call(*args, **kwargs) -> bool:
    """any call on any device (plain PyTorch)"""
    return True


def any_cuda_call(*args, **kwargs) -> bool:
    """any call on a CUDA device (the kernel refuses what it cannot run, saying why)"""
    return True


def _triton(name: str) -> Impl | None:
    try:
        module = importlib.import_module(f"smolvlm_fast.kernels.{TRITON_MODULES[name]}")
    except ImportError:  # triton not installed
        return None
    covers = getattr(module, "COVERS", {}).get(name, any_cuda_call)
    return Impl("triton", ORDER.index("triton"), "cuda", getattr(module, name), covers)


def _cuda(name: str) -> Impl | None:
    from . import cuda

    if not cuda.available() or name not in cuda.COVERS:  # smolvlm_fast._C not built, or no CUDA kernel for it
        return None
    # cuda.LAUNCH runs the kernel without checking covers again: the walk below has just done so
    return Impl("cuda", ORDER.index("cuda"), "cuda", cuda.LAUNCH[name], cuda.COVERS[name])


@functools.cache
def implementations(name: str) -> tuple[Impl, ...]:
    """The implementations of op `name` available in this install, in the order they are tried."""
    if name not in OPS:
        raise ValueError(f"no op {name!r} (ops: {', '.join(OPS)})")
    from . import reference

    found = [_cuda(name), _triton(name), Impl("reference", ORDER.index("reference"), None, getattr(reference, name),
                                               any_call)]
    return tuple(sorted((i for i in found if i is not None), key=lambda i: i.rank))


def available(name: str) -> list[str]:
    return [i.name for i in implementations(name)]


@contextlib.contextmanager
def prefer(impl: str | None):
    """Within the block, every op that has `impl` is forced to it; the ops that do not run the reference."""
    token = _preferred.set(impl)
    try:
        yield
    finally:
        _preferred.reset(token)


def _on_its_device(impl: Impl, first_arg) -> bool:
    return impl.device is None or getattr(first_arg, "is_cuda", False)


def pick(name: str, impl: str | None, args: tuple, kwargs: dict) -> Impl:
    """The implementation that runs ops.<name>(*args, **kwargs); the first argument's device is the call's."""
    impls = implementations(name)
    forced = impl or _preferred.get()
    start = 0
    if forced is not None:
        names = [i.name for i in impls]
        if forced not in names:
            if impl is None:  # prefer() of an implementation this op does not have
                return impls[-1]
            raise ValueError(f"ops.{name}: implementation {impl!r} is not available (have {names})")
        start = names.index(forced)
        if not _on_its_device(impls[start], args[0]):
            return impls[start]
    return next(i for i in impls[start:] if _on_its_device(i, args[0]) and i.covers(*args, **kwargs))


def run(name: str, impl: str | None, *args, **kwargs):
    return pick(name, impl, args, kwargs).fn(*args, **kwargs)


def _describe(t) -> str:
    if hasattr(t, "dtype") and hasattr(t, "shape"):
        return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} on {t.device}"
    return type(t).__name__


def explain(name: str, *args, impl: str | None = None, **kwargs) -> str:
    """Which implementation runs ops.<name>(*args, **kwargs) and why: each one in order, what became of it on this
    call, and what it covers."""
    chosen, forced = pick(name, impl, args, kwargs), impl or _preferred.get()
    ranks = {i.name: i.rank for i in implementations(name)}
    first_tried = ranks.get(forced, len(ORDER)) if forced else 0  # prefer() of a missing one: the reference
    lines = [f"ops.{name}({_describe(args[0])}, ...) runs {chosen.name}" + (f" (forced: {forced!r})" if forced else "")]
    for i in implementations(name):
        if i is chosen:
            verdict = "runs" if _on_its_device(i, args[0]) else "runs off its device"
        elif i.rank > chosen.rank:
            verdict = "not tried"
        elif i.rank < first_tried:
            verdict = "passed over (forced)"
        elif not _on_its_device(i, args[0]):
            verdict = f"not on {i.device}"
        else:
            verdict = "does not cover it"
        lines.append(f"  {i.name:<10} {verdict:<21} {i.scope}")
    return "\n".join(lines)
