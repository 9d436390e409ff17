"""Which implementation runs an op call, and why: the one place that decides (ops/README.md has the contracts).

Every implementation of an op is an `Impl`: a rank (its place in ORDER), the device its kernels run on, the function,
and `covers(*args, **kwargs)`, a predicate saying whether the function takes this call (dtypes, shapes, layouts). The
implementations say what they cover where their code is: ops/cuda.py's COVERS mirrors the CUDA kernels' limits, a
Triton module of kernels/ may hold a COVERS of its own (without one its kernels take any call on a CUDA device), and
the PyTorch reference takes everything. `pick` walks the kernel order and takes the first implementation on the
call's device that covers it, so the reference (last, any device) always ends the walk.

The kernel order is one process-wide setting: SMOLVLM_FAST_KERNELS ("cuda,triton,reference", a subset, or one
name), or `use_kernels(...)`, which `from_pretrained(kernels=)`, `LLM(kernels=)` and `--kernels` call. Process-wide
(not a ContextVar) so that it reaches every thread: the engine's loop, the server's workers. The reference always
ends the order, named or not: it is what a call no kernel covers gets.

Forcing one (`impl=` for a call, `prefer()` for a block of code, a ContextVar: the tests use it): on its device a
forced implementation runs the calls it covers and hands the rest down the order (so `impl="cuda"` always gives the
contract's result); off its device it runs anyway and speaks for itself (the CUDA wrappers refuse CPU tensors with a
clear error; the Triton kernels run CPU tensors in Triton's interpreter, which the tests use).

First use (ops/selfcheck.py): the first call of each (op, implementation, shape class) on a GPU is checked against
the reference; a kernel that fails (wrong result, a launch or architecture error) is disabled for that op for the
process with one warning, and the call goes on down the order.

Nothing here imports torch: the table is built on first use, and importing smolvlm_fast.ops stays PyTorch-free.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import InputError
from . import selfcheck

OPS = ("rms_norm", "layer_norm", "silu_and_mul", "gelu_tanh", "patch_embed", "dwsep_patch_embed", "rope_attention",
       "write_kv_cache", "paged_attention", "cross_attention", "int4_gemm")
ORDER = ("cuda", "triton", "reference")  # the default order; the rank of an implementation is its index here
KERNELS_ENV = "SMOLVLM_FAST_KERNELS"
# op -> the module of kernels/ that implements it in Triton
TRITON_MODULES = {"rms_norm": "rms_norm", "layer_norm": "layer_norm", "silu_and_mul": "activations",
                  "gelu_tanh": "activations", "write_kv_cache": "write_kv_cache", "rope_attention": "rope_attention",
                  "paged_attention": "paged_attention", "cross_attention": "cross_attention",
                  "int4_gemm": "int4_gemm", "patch_embed": "patch_embed", "dwsep_patch_embed": "patch_embed"}
_preferred: contextvars.ContextVar[str | None] = contextvars.ContextVar("smolvlm_fast_ops_preferred", default=None)
_chosen: tuple[tuple[str, ...], str] | None = None  # use_kernels(): (order, who set it); None: SMOLVLM_FAST_KERNELS
_checked: set[tuple] = set()               # (op, implementation, shape class) that passed their first use
_disabled: dict[tuple[str, str], str] = {}  # (op, implementation) -> why it failed its first use
_stand_ins: dict[tuple[str, str], Impl] = {}  # tests: an implementation in place of the real one (stand_in)
_lock = threading.Lock()


class KernelWarning(RuntimeWarning):
    """An implementation failed its first use and is disabled for the process (the message says which and why)."""


@dataclass(frozen=True)
class Impl:
    name: str                # "cuda" | "triton" | "reference"
    rank: int                # ORDER.index(name)
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


# ---------------------------------------------------------------- the kernel order

def parse_kernels(spec: str | Iterable[str], source: str = "kernels") -> tuple[str, ...]:
    """"cuda,triton,reference", a subset in any order, or one name -> the order, the reference last (added when not
    named). A bad one is an InputError naming `source` and the allowed values."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if not names or any(n not in ORDER for n in names) or len(set(names)) != len(names):
        raise InputError(f"{source}={spec!r}: give one or more of {', '.join(ORDER)}, comma-separated, each at most "
                         f"once, in the order to try them (e.g. 'triton,reference' or 'reference')")
    names = [n for n in names if n != "reference"]
    return (*names, "reference")


@functools.lru_cache(maxsize=8)
def _from_env(value: str | None) -> tuple[str, ...]:
    return ORDER if value is None or not value.strip() else parse_kernels(value, KERNELS_ENV)


def use_kernels(spec: str | Iterable[str] | None, source: str = "kernels") -> None:
    """Set the process-wide kernel order (None: back to SMOLVLM_FAST_KERNELS, else the default)."""
    global _chosen
    _chosen = None if spec is None else (parse_kernels(spec, source), source)


def kernel_order() -> tuple[str, ...]:
    """The order the ops try their implementations in: use_kernels()'s, else SMOLVLM_FAST_KERNELS's, else ORDER."""
    return _chosen[0] if _chosen is not None else _from_env(os.environ.get(KERNELS_ENV))


def kernel_order_source() -> str:
    """Who chose the order, in words (python -m smolvlm_fast.env prints it)."""
    if _chosen is not None:
        return f"set by {_chosen[1]}"
    return f"{KERNELS_ENV}={os.environ[KERNELS_ENV]}" if os.environ.get(KERNELS_ENV, "").strip() else "the default"


# ---------------------------------------------------------------- the implementations

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
    """The implementations of op `name` available in this install, in ORDER (the default order)."""
    if name not in OPS:
        raise ValueError(f"no op {name!r} (ops: {', '.join(OPS)})")
    from . import reference

    found = {i.name: i for i in (_cuda(name), _triton(name)) if i is not None}
    found["reference"] = Impl("reference", ORDER.index("reference"), None, getattr(reference, name), any_call)
    found.update({impl: i for (op, impl), i in _stand_ins.items() if op == name})
    return tuple(sorted(found.values(), key=lambda i: i.rank))


def available(name: str) -> list[str]:
    return [i.name for i in implementations(name)]


def disabled(name: str, impl: str) -> str | None:
    """Why `impl` of op `name` is disabled for this process (it failed its first use), or None."""
    return _disabled.get((name, impl))


@contextlib.contextmanager
def prefer(impl: str | None):
    """Within the block (this thread or task), every op that has `impl` is forced to it; the others run the
    reference."""
    token = _preferred.set(impl)
    try:
        yield
    finally:
        _preferred.reset(token)


@contextlib.contextmanager
def stand_in(name: str, impl: Impl):
    """Tests: `impl` replaces (or adds) the implementation of its name for op `name` within the block; the
    first-use state (checked, disabled) starts fresh and is cleared again after."""
    _stand_ins[(name, impl.name)] = impl
    implementations.cache_clear()
    reset_first_use()
    try:
        yield
    finally:
        del _stand_ins[(name, impl.name)]
        implementations.cache_clear()
        reset_first_use()


def reset_first_use() -> None:
    """Forget which calls passed their first use and which implementations are disabled."""
    with _lock:
        _checked.clear()
        _disabled.clear()


# ---------------------------------------------------------------- the walk

def _on_its_device(impl: Impl, first_arg) -> bool:
    return impl.device is None or getattr(first_arg, "is_cuda", False)


def walk(name: str, forced: str | None) -> list[Impl]:
    """The implementations a call may run, in the order tried: the kernel order (a forced one first, then those after
    it in the order, else the reference), less the disabled ones and those this install lacks."""
    have = {i.name: i for i in implementations(name)}
    order = kernel_order()
    if forced is not None:
        order = order[order.index(forced):] if forced in order else (forced, "reference")
    return [have[n] for n in order if n in have and (name, n) not in _disabled]


def pick(name: str, impl: str | None, args: tuple, kwargs: dict) -> Impl:
    """The implementation that runs ops.<name>(*args, **kwargs); the first argument's device is the call's."""
    forced = impl or _preferred.get()
    if forced is not None and forced not in available(name):
        if impl is None:  # prefer() of an implementation this op does not have
            return implementations(name)[-1]
        raise ValueError(f"ops.{name}: implementation {impl!r} is not available (have {available(name)})")
    impls = walk(name, forced)
    if forced is not None and impls[0].name == forced and not _on_its_device(impls[0], args[0]):
        return impls[0]
    return next(i for i in impls if _on_its_device(i, args[0]) and i.covers(*args, **kwargs))


def run(name: str, impl: str | None, *args, **kwargs):
    chosen = pick(name, impl, args, kwargs)
    if chosen.name == "reference":
        return chosen.fn(*args, **kwargs)
    key = (name, chosen.name, selfcheck.shape_class(args, kwargs))
    if key in _checked:
        return chosen.fn(*args, **kwargs)
    return _first_use(name, impl, chosen, key, args, kwargs)


def _first_use(name: str, impl: str | None, chosen: Impl, key: tuple, args: tuple, kwargs: dict):
    """The first call of its kind: the CUDA build checked against the device, then (where the self-check is on)
    the result against the reference; a failure disables `chosen` for the op and the call goes down the order."""
    problem = _unusable(chosen, args[0])
    if problem is None:
        if not selfcheck.wanted(args[0]):
            if not selfcheck.capturing(args[0]):
                _checked.add(key)
            return chosen.fn(*args, **kwargs)
        result, problem = selfcheck.check(name, chosen.fn, implementations(name)[-1].fn, args, kwargs)
        if problem is None:
            _checked.add(key)
            return result
    _disable(name, chosen.name, problem)
    return run(name, impl, *args, **kwargs)


def _unusable(chosen: Impl, first_arg) -> str | None:
    """Why smolvlm_fast._C cannot run on this call's GPU (another architecture, an old driver), or None."""
    if chosen.name != "cuda" or not getattr(first_arg, "is_cuda", False):
        return None
    from . import cuda

    return cuda.unusable(first_arg.device.index)


def _disable(name: str, impl: str, problem: str) -> None:
    with _lock:
        first = (name, impl) not in _disabled
        _disabled.setdefault((name, impl), problem)
    if first:  # exactly one warning per (op, implementation), whichever thread saw it first
        after = next((i.name for i in walk(name, None)), "reference")
        warnings.warn(f"ops.{name}: the {impl} implementation failed its first use and is disabled for this process "
                      f"({problem}); {name} calls go to {after} instead (python -m smolvlm_fast.env lists this; "
                      f"{selfcheck.MODE_ENV}=0 turns the check off)", KernelWarning, stacklevel=5)


# ---------------------------------------------------------------- explain

def _describe(t) -> str:
    if hasattr(t, "dtype") and hasattr(t, "shape"):
        return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} on {t.device}"
    return type(t).__name__


def explain(name: str, *args, impl: str | None = None, **kwargs) -> str:
    """Which implementation runs ops.<name>(*args, **kwargs) and why: each one, what became of it on this call, and
    what it covers."""
    chosen, forced = pick(name, impl, args, kwargs), impl or _preferred.get()
    tried = [i.name for i in walk(name, forced)] if forced in available(name) or not forced else ["reference"]
    head = f"ops.{name}({_describe(args[0])}, ...) runs {chosen.name}"
    lines = [head + (f" (forced: {forced!r})" if forced else "")]
    for i in implementations(name):
        lines.append(f"  {i.name:<10} {_verdict(name, i, chosen, tried, forced, args):<21} {i.scope}")
    return "\n".join(lines)


def _verdict(name: str, i: Impl, chosen: Impl, tried: list[str], forced: str | None, args: tuple) -> str:
    if i is chosen:
        return "runs" if _on_its_device(i, args[0]) else "runs off its device"
    if (name, i.name) in _disabled:
        return f"disabled ({_disabled[(name, i.name)]})"
    if i.name not in tried:
        return "passed over (forced)" if forced else "not in the order"
    if tried.index(i.name) > tried.index(chosen.name):
        return "not tried"
    if not _on_its_device(i, args[0]):
        return f"not on {i.device}"
    return "does not cover it"
