"""`python -m smolvlm_fast.env`: what this install runs on, for bug reports and for checking a source build.

Prints the versions (smolvlm_fast, Python, NumPy, PyTorch, Triton, CUDA), the GPU, whether the C++ extensions are
built (smolvlm_fast._cpu with its SIMD level, smolvlm_fast._C with its GPU architectures), the backend a caller
who names none gets on the CPU and by default (with why: engine/backend.py decides), the precision it computes in,
the C++ pool's threads, the kernel order (SMOLVLM_FAST_KERNELS, kernels=, --kernels) and the self-check, and
for each op the implementations it gets on a CUDA tensor in the order ops/registry.py tries them, why any other is
left out (not in the order, not built, disabled by a failed self-check), and what each kernel covers.
Works without PyTorch (it says so) and without a GPU.
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"
    except Exception as exc:  # installed but broken (say, triton without a working driver)
        return f"installed, but import fails: {type(exc).__name__}: {exc}"


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    release = [line for line in out.splitlines() if "release" in line]
    return release[0].split("release", 1)[1].split(",")[0].strip() if release else None


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}" if code > 0 else "none"


def _extensions() -> tuple[list[str], object]:
    lines = []
    from .cpu.native import _cpu, import_error
    if _cpu is not None:
        lines.append(f"smolvlm_fast._cpu     built (simd: {getattr(_cpu, 'simd', '?')})")
    else:  # not built, or built for another CPU (its message says which)
        why = import_error if "built for" in (import_error or "") else "the NumPy fallback runs"
        lines.append(f"smolvlm_fast._cpu     not usable ({why})")
    try:
        from . import _C
    except ImportError:
        _C = None
        lines.append("smolvlm_fast._C       not built (the Triton kernels run; see the README: Building from source on "
                     "a CUDA machine)")
    if _C is not None:
        lines.append(f"smolvlm_fast._C       built (archs: {_C.archs or '?'}, CUDA runtime "
                     f"{_cuda_version(_C.cuda_runtime_version())}, driver supports CUDA "
                     f"{_cuda_version(_C.cuda_driver_version())})")
    return lines, _C


def _gpu_lines(torch, _C) -> list[str]:
    if torch is not None and torch.cuda.is_available():
        lines = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}                 {p.name} (compute capability {p.major}.{p.minor}, "
                         f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)")
        return lines
    if _C is not None and _C.device_count() > 0:
        return [f"GPU {i}                 compute capability {_C.compute_capability(i)} (PyTorch does not see it)"
                for i in range(_C.device_count())]
    return ["GPU                   none visible"]


def _op_lines(torch) -> list[str]:
    """From the registry the ops dispatch with (ops/registry.py): the kernel order and who chose it, the self-check,
    then per op the implementation a CUDA tensor gets first, the ones it may get in the order tried, why the others
    are left out (not in the order, not in this install, disabled by a failed self-check), and what each covers."""
    from . import ops
    from .ops import registry, selfcheck

    try:
        registry.kernel_order()
    except ValueError as e:
        return [f"kernel order          {e}"]
    lines = [(f"kernel order          {', '.join(registry.kernel_order())} ({registry.kernel_order_source()}; "
              f"{registry.KERNELS_ENV}, kernels=, --kernels set it)"),
             f"self-check            {_self_check_mode(selfcheck)}"]
    lines += _cuda_build_lines(torch)
    lines += ["ops on a CUDA tensor: the first implementation in brackets that covers a call runs it",
              "(the reference covers every call; ops.explain(op, *args) says which one runs a call, and why):"]
    for name in ops.OPS:
        impls = registry.walk(name, None)
        left_out = "; ".join(f"{impl}: {why}" for impl, why in _left_out(name, impls))
        lines.append(f"  {name:<20} {impls[0].name:<10} [{', '.join(i.name for i in impls)}]"
                     + (f"  ({left_out})" if left_out else ""))
        lines += [f"      {i.name:<9} {i.scope}" for i in impls if i.name != "reference"]
    return lines


def _left_out(name: str, impls) -> list[tuple[str, str]]:
    from .ops import registry

    tried, have = {i.name for i in impls}, registry.available(name)
    return [(impl, _why_not(name, impl, impl in have)) for impl in registry.ORDER if impl not in tried]


def _why_not(name: str, impl: str, installed: bool) -> str:
    from .ops import registry

    if registry.disabled(name, impl):
        return f"disabled, failed its first use: {registry.disabled(name, impl)}"
    if installed:
        return "not in the kernel order"
    if impl == "triton":
        return "triton not installed"
    return "no CUDA kernel for this op" if _cuda_built() else "smolvlm_fast._C not built"


def _cuda_built() -> bool:
    from .ops.cuda_limits import _C
    return _C is not None


def _self_check_mode(selfcheck) -> str:
    try:
        mode = selfcheck.mode()
    except ValueError as e:
        return str(e)
    return {"gpu": f"on for calls on a CUDA device ({selfcheck.MODE_ENV}=0 turns it off, =all checks every call)",
            "off": f"off ({selfcheck.MODE_ENV}=0)",
            "all": f"on for every call ({selfcheck.MODE_ENV}=all)"}[mode]


def _cuda_build_lines(torch) -> list[str]:
    """Whether smolvlm_fast._C runs on each visible GPU (ops/cuda.py: unusable)."""
    if not _cuda_built() or not torch.cuda.is_available():
        return []
    from .ops import cuda

    lines = []
    for i in range(torch.cuda.device_count()):
        problem = cuda.unusable(i)
        lines.append(f"_C on GPU {i}           " + ("runs" if problem is None else f"cannot run: {problem} (the "
                                                                                         "next implementation runs)"))
    return lines


def _backend_lines() -> list[str]:
    """Which backend and precision from_pretrained / LLM / the CLI give a caller who names neither, and the threads."""
    from .engine.backend import backend_choice
    from .engine.threads import affinity_cpus, cpu_threads

    cpu, why = backend_choice("cpu")
    lines = [f"cpu backend           {cpu} ({why})"]
    default, why_default = backend_choice(None)
    if default != cpu:
        lines.append(f"default backend       {default} ({why_default}; device='cpu' gives {cpu})")
    if cpu == "numpy":
        lines.append("cpu precision         the checkpoint's: bfloat16 for a bf16 checkpoint, float32 for float32 or "
                     "float16 ones and GGUF files (dtype='bfloat16' / 'float32', --dtype, sets it)")
        lines.append(f"cpu bf16 products     {_bf16_kernel()}")
    else:
        lines.append("cpu precision         float32 (dtype='bfloat16' / 'float16', --dtype, sets it)")
    source = "SMOLVLM_FAST_NUM_THREADS" if os.environ.get("SMOLVLM_FAST_NUM_THREADS") else "the CPUs it may run on"
    lines.append(f"cpu threads           {cpu_threads()} ({source}: {affinity_cpus()} in this process's affinity; "
                 "torch, where imported, gets at most as many)")
    return lines


def _bf16_kernel() -> str:
    """The kernel the bf16 products run on (csrc/cpu/bf16_gemm.h), and why."""
    from .cpu.native import _cpu

    isa = _cpu.bf16_isa()
    why = {"amx": "AMX tiles", "avx512bf16": "AVX512-BF16 vdpbf16ps; no AMX here (or the OS refused it)",
           "f32": "float32 FMAs over bf16 weights: no AVX512-BF16 here", "amx-emulated": "AMX emulated (tests only)"}
    if os.environ.get("SMOLVLM_FAST_CPU_ISA"):
        return f"{isa} (SMOLVLM_FAST_CPU_ISA={os.environ['SMOLVLM_FAST_CPU_ISA']} caps it)"
    return f"{isa} ({why.get(isa, isa)})"


def report() -> list[str]:
    from . import __version__

    try:
        import torch
    except ImportError:
        torch = None
    lines = [f"smolvlm_fast          {__version__}",
             f"python                {platform.python_version()} ({sys.executable})",
             f"numpy                 {_version('numpy')}"]
    if torch is None:
        lines.append("torch                 not installed (the NumPy backend runs; no GPU path)")
    else:
        lines.append(f"torch                 {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    lines.append(f"triton                {_version('triton')}")
    lines.append(f"nvcc                  {_nvcc_version() or 'not found'}")
    ext_lines, _C = _extensions()
    lines += _gpu_lines(torch, _C)
    lines += ext_lines
    lines += _backend_lines()
    if torch is not None:
        lines.append(f"cuda graphs           {_graphs_line()}")
        lines += _op_lines(torch)
    return lines


def _graphs_line() -> str:
    from .errors import InputError
    from .models.decode_graphs import GRAPHS_ENV, graphs_wanted
    try:
        wanted = graphs_wanted(None)
    except InputError as e:
        return str(e)
    if wanted:
        return f"on ({GRAPHS_ENV}=1): decode steps of the torch backend on a GPU are replayed from graphs"
    return f"off (the default until measured on a GPU; {GRAPHS_ENV}=1, cuda_graphs=True or --cuda-graphs turns them on)"


def main() -> None:
    print("\n".join(report()))


if __name__ == "__main__":
    main()
