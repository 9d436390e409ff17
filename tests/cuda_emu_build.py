"""Builds csrc/cuda/ under the CPU emulator (csrc/cuda/emu/) with g++, for tests/test_cuda_emu.py.

Two products, both cached in build/cuda_emu/<hash of csrc/cuda/** and the flags>/ (reused while nothing changes):
  module(): the extension smolvlm_fast._C itself (bindings.cpp and the .cu files setup.py builds, unchanged) compiled
            as host C++: the same entry points and argument checks, the kernels run by the emulator on host pointers.
            Its C++ namespace is renamed (smolvlm_cuda_emu) so that it loads beside the real _C in one process.
  driver(flags): csrc/cuda/emu/driver.cpp linked with the .cu files, a standalone program for the sanitizer builds
            (a Python process cannot host AddressSanitizer or ThreadSanitizer).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CUDA_DIR = REPO / "csrc" / "cuda"
BUILD_DIR = REPO / "build" / "cuda_emu"
KERNEL_SOURCES = ("int4_gemm.cu", "paged_attention.cu", "cross_attention.cu", "write_kv_cache.cu", "patch_embed.cu",
                  "device_info.cu")
# -fno-strict-aliasing: the kernels read memory through other types (16-byte vectors), as CUDA allows
FLAGS = ("-std=c++20", "-pthread", "-fno-strict-aliasing", "-DSMOLVLM_CUDA_EMU", "-Dsmolvlm_cuda=smolvlm_cuda_emu",
         f"-I{CUDA_DIR}")
OPT = ("-O1",)
SANITIZERS = {"address": ("-O1", "-g1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"),
              "thread": ("-O1", "-g1", "-fsanitize=thread")}
TIMEOUT = 600


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def sources_hash(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode())
    for path in sorted(CUDA_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".cu", ".cuh", ".cpp", ".h"):
            digest.update(str(path.relative_to(CUDA_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{done.stdout[-4000:]}{done.stderr[-8000:]}")


def _build(name: str, flags: tuple[str, ...], sources: list[Path], link: list[str], output: str) -> Path:
    """Compiles `sources` (two at a time: CI has 2 cores) and links them into build/cuda_emu/<hash>/<output>; a build
    happens in a scratch folder renamed into place, so concurrent runs never see half a build."""
    out_dir = BUILD_DIR / f"{name}-{sources_hash(name, *flags, *link)}"
    if (out_dir / output).exists():
        return out_dir / output
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=BUILD_DIR, prefix="building-"))
    try:
        cxx = compiler()
        objects = [scratch / (src.name + ".o") for src in sources]
        jobs = [[cxx, *flags, "-x", "c++", "-c", str(src), "-o", str(obj)] for src, obj in zip(sources, objects)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(_run, jobs))
        _run([cxx, *flags, *map(str, objects), *link, "-o", str(scratch / output)])
        try:
            scratch.rename(out_dir)
        except OSError:  # another run finished first
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir / output


def module():
    """The emulated smolvlm_fast._C, imported (not registered in sys.modules)."""
    import pybind11

    paths = sysconfig.get_paths()
    includes = [f"-I{pybind11.get_include()}", f"-I{paths['include']}", f"-I{paths['platinclude']}"]
    flags = (*FLAGS, *OPT, "-fPIC", "-fvisibility=hidden", *includes)
    sources = [CUDA_DIR / "bindings.cpp", *(CUDA_DIR / s for s in KERNEL_SOURCES)]
    path = _build("module", flags, sources, ["-shared"], "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    spec = importlib.util.spec_from_file_location("smolvlm_cuda_emu._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def driver(sanitizer: str | None = None) -> Path:
    """csrc/cuda/emu/driver.cpp built with -fsanitize=<sanitizer> ("address", with UBSan, or "thread"), or without."""
    flags = (*FLAGS, *(SANITIZERS[sanitizer] if sanitizer else OPT))
    sources = [CUDA_DIR / "emu" / "driver.cpp", *(CUDA_DIR / s for s in KERNEL_SOURCES)]
    return _build(f"driver-{sanitizer or 'plain'}", flags, sources, [], "driver")
