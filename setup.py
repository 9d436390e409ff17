"""Build script: the optional C++ extensions. Everything else is configured in pyproject.toml.

smolvlm_fast._cpu (csrc/cpu/, pybind11): the CPU int4 / int8 matrix products and decode attention. It is optional: if it does not
build, installation still succeeds (with a warning) and smolvlm_fast.quant falls back to NumPy.
    SMOLVLM_FAST_BUILD_CPU=0   skip it
    SMOLVLM_FAST_BUILD_CPU=1   a failed build is an error
It is compiled for the building machine (-march=native when the compiler takes it), so build it where it runs.

smolvlm_fast._C (csrc/cuda/, pybind11, compiled and linked by nvcc; no PyTorch headers): the CUDA kernels. Optional too:
without it smolvlm_fast.ops runs the Triton kernels.
    SMOLVLM_FAST_BUILD_CUDA=0  skip it;  =1  build it, a failure (or no nvcc) is an error;  unset: build it when nvcc
                               is found (CUDA_HOME/bin, PATH, /usr/local/cuda/bin), warn and go on if that fails
    SMOLVLM_FAST_CUDA_ARCH     the GPU architectures, TORCH_CUDA_ARCH_LIST-style: "80;90", "8.6", "9.0+PTX", "sm_89".
                               Default: the local GPU's (nvidia-smi), else 80 alone (sm_80 code, which runs on 8.x,
                               and its PTX, which the driver compiles for newer GPUs at first use), to keep CI short.
    SMOLVLM_FAST_BUILD_JOBS    parallel nvcc processes (default: the CPU count)

`pip install -e .` builds the .so into smolvlm_fast/ itself, so the editable install imports it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CPU_SOURCES = ["csrc/cpu/bindings.cpp", "csrc/cpu/thread_pool.cpp", "csrc/cpu/quant_gemm.cpp",
               "csrc/cpu/paged_attention.cpp", "csrc/cpu/decoder_step.cpp", "csrc/cpu/prefill_gemm.cpp",
               "csrc/cpu/small_ops.cpp", "csrc/cpu/bindings_bf16.cpp", "csrc/cpu/bf16_gemm.cpp",
               "csrc/cpu/bf16_f32.cpp", "csrc/cpu/bf16_dpbf16.cpp", "csrc/cpu/bf16_amx.cpp",
               "csrc/cpu/prefill_gemm_bf16.cpp", "csrc/cpu/vision_attention.cpp",
               "csrc/cpu/vision_encoder.cpp", "csrc/cpu/bindings_vision.cpp"]
CPU_FLAGS = ["-O3", "-pthread"]  # with Pybind11Extension's own: -std=c++17, -fvisibility=hidden, -g0
NATIVE_FLAGS = ["-march=native"]  # AVX-512 / AVX2 + FMA + F16C where the machine has them; dropped if rejected


def build_setting(name: str) -> str | None:
    """'0' (skip), '1' (required) or None (optional: try, warn on failure)."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value or None


def cpu_extension():
    from pybind11.setup_helpers import Pybind11Extension

    return Pybind11Extension("smolvlm_fast._cpu", CPU_SOURCES, include_dirs=["csrc/cpu"],
                             depends=["csrc/cpu/thread_pool.h", "csrc/cpu/quant_gemm.h", "csrc/cpu/paged_attention.h",
                                      "csrc/cpu/decoder_step.h", "csrc/cpu/prefill_gemm.h", "csrc/cpu/small_ops.h",
                                       "csrc/cpu/simd.h", "csrc/cpu/simd_math.h", "csrc/cpu/half.h", "csrc/cpu/bf16_gemm.h",
                                       "csrc/cpu/bf16_kernels.h", "csrc/cpu/amx_tiles.h",
                                       "csrc/cpu/prefill_gemm_bf16.h", "csrc/cpu/vision_attention.h",
                                       "csrc/cpu/vision_encoder.h", "csrc/cpu/py_checks.h"], extra_compile_args=CPU_FLAGS,
                             extra_link_args=["-pthread"], cxx_std=17)


# ---------------------------------------------------------------- the CUDA extension, smolvlm_fast._C

CUDA_DIR = "csrc/cuda"
CUDA_SOURCES = [f"{CUDA_DIR}/{name}" for name in ("bindings.cpp", "int4_gemm.cu", "paged_attention.cu",
                                                   "cross_attention.cu", "write_kv_cache.cu", "patch_embed.cu",
                                                   "device_info.cu")]
CUDA_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]  # -lineinfo: source lines in compute-sanitizer reports, no slowdown
DEFAULT_CUDA_ARCH = "80"


def cuda_source_hash() -> str:
    """sha256 of csrc/cuda/'s code (names and contents): baked into the module, so a test can tell a stale build."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parent / CUDA_DIR).iterdir()):
        if path.suffix in (".cu", ".cuh", ".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def local_gpu_arch() -> str | None:
    """The first visible GPU's compute capability ("9.0"), from nvidia-smi; None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def cuda_archs() -> list[tuple[str, bool]]:
    """[(arch number like "90", with PTX)], from SMOLVLM_FAST_CUDA_ARCH, the local GPU, or DEFAULT_CUDA_ARCH. The
    last (highest) architecture always carries PTX too, so the module also runs on GPUs newer than it names."""
    spec = os.environ.get("SMOLVLM_FAST_CUDA_ARCH", "").strip() or local_gpu_arch() or DEFAULT_CUDA_ARCH
    archs = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().lower().removeprefix("sm_").removeprefix("compute_")
        if not item:
            continue
        ptx = item.endswith("+ptx")
        number = item.removesuffix("+ptx").replace(".", "")
        if not (number[:-1].isdigit() and (number[-1].isdigit() or number[-1] == "a")) or int(number.rstrip("a")) < 80:
            raise SystemExit(f"SMOLVLM_FAST_CUDA_ARCH: {item!r} is not a CUDA architecture >= 8.0 "
                             "(like 80, 8.6, sm_90)")
        archs.append((number, ptx))
    if not archs:
        raise SystemExit(f"SMOLVLM_FAST_CUDA_ARCH: no architecture in {spec!r}")
    archs.sort(key=lambda a: int(a[0].rstrip("a")))  # by number: "100" (Blackwell) after "90"
    archs[-1] = (archs[-1][0], True)
    return archs


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for number, ptx in archs:
        codes = f"sm_{number},compute_{number}" if ptx else f"sm_{number}"
        flags.append(f"-gencode=arch=compute_{number},code=[{codes}]")
    return flags


def cuda_extension() -> Extension:
    headers = [str(p) for p in Path(CUDA_DIR).glob("*.cuh")]
    return Extension("smolvlm_fast._C", CUDA_SOURCES, depends=headers)


def build_cuda(cmd: build_ext, ext: Extension) -> None:
    """Compiles csrc/cuda/ with nvcc (the .cu files and bindings.cpp, in parallel) and links the module with nvcc, the
    CUDA runtime linked in statically (so it imports without a GPU, a driver or libcudart on the library path)."""
    import sysconfig

    import pybind11

    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME, or put nvcc on PATH)")
    archs = cuda_archs()
    target = Path(cmd.get_ext_fullpath(ext.name))
    tmp = Path(cmd.build_temp) / "cuda"
    tmp.mkdir(parents=True, exist_ok=True)
    arch_names = ";".join(f"sm_{n}" for n, _ in archs)
    info = (f'#define SMOLVLM_FAST_CUDA_ARCHS "{arch_names}"\n'
            f'#define SMOLVLM_FAST_CUDA_SOURCE_HASH "{cuda_source_hash()}"\n')
    info_path = tmp / "build_info.h"
    if not info_path.exists() or info_path.read_text() != info:
        info_path.write_text(info)
    inputs = list(ext.sources) + list(ext.depends) + [str(info_path)]
    if target.exists() and not cmd.force and all(os.path.getmtime(p) <= target.stat().st_mtime for p in inputs):
        return
    paths = sysconfig.get_paths()
    includes = [f"-I{d}" for d in dict.fromkeys([CUDA_DIR, str(tmp), pybind11.get_include(), paths["include"],
                                                  paths["platinclude"]])]
    flags = CUDA_FLAGS + gencode_flags(archs) + ["-Xcompiler", "-fPIC,-fvisibility=hidden"] + includes
    objects, jobs = [], []
    for src in ext.sources:
        obj = tmp / (Path(src).name + ".o")
        objects.append(str(obj))
        jobs.append([nvcc, "-c", src, "-o", str(obj), *flags])
    workers = int(os.environ.get("SMOLVLM_FAST_BUILD_JOBS", "0") or 0) or os.cpu_count() or 1
    print(f"building {ext.name} with {nvcc} for {arch_names} ({workers} jobs)", file=sys.stderr)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: subprocess.run(job, capture_output=True, text=True), jobs))
    failed = [(job, r) for job, r in zip(jobs, results) if r.returncode != 0]
    for job, r in failed:
        print(" ".join(job) + "\n" + r.stdout + r.stderr, file=sys.stderr)
    if failed:
        raise RuntimeError(f"nvcc failed on {', '.join(job[2] for job, _ in failed)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    link = subprocess.run([nvcc, "-shared", "-cudart=static", *objects, "-o", str(target)], capture_output=True,
                          text=True)
    if link.returncode != 0:
        raise RuntimeError(f"linking {ext.name} failed:\n{link.stdout}{link.stderr}")


SWITCHES = {"smolvlm_fast._cpu": "SMOLVLM_FAST_BUILD_CPU", "smolvlm_fast._C": "SMOLVLM_FAST_BUILD_CUDA"}
FALLBACKS = {"smolvlm_fast._cpu": "its NumPy fallback", "smolvlm_fast._C": "its Triton kernels"}


class OptionalBuildExt(build_ext):
    """Builds each extension; one that fails is skipped with a warning unless its switch says it is required."""

    def build_extension(self, ext):
        switch = SWITCHES.get(ext.name, "SMOLVLM_FAST_BUILD_CPU")
        required = build_setting(switch) == "1"
        if ext.name == "smolvlm_fast._cpu" and self.compiler.compiler_type == "unix":
            flags = NATIVE_FLAGS if self._accepts(NATIVE_FLAGS) else []
            ext.extra_compile_args = list(ext.extra_compile_args) + flags
        try:
            if ext.name == "smolvlm_fast._C":
                build_cuda(self, ext)
            else:
                super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, a missing compiler...
            if required:
                raise
            fallback = FALLBACKS.get(ext.name, "its fallback")
            self.warn(f"could not build {ext.name} ({exc}); smolvlm_fast will use {fallback}. "
                      f"Set {switch}=1 to make this an error.")
            print(f"WARNING: {ext.name} was not built: {exc}", file=sys.stderr)

    def run(self):
        try:
            super().run()
        except Exception as exc:
            if any(build_setting(switch) == "1" for switch in SWITCHES.values()):
                raise
            print(f"WARNING: the C++ extensions were not built: {exc}", file=sys.stderr)

    def _accepts(self, flags: list[str]) -> bool:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "flag_test.cpp")
            with open(src, "w") as f:
                f.write("int main() { return 0; }\n")
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            except Exception:
                return False
        return True


def ext_modules():
    return cpu_modules() + cuda_modules()


def cpu_modules():
    setting = build_setting("SMOLVLM_FAST_BUILD_CPU")
    if setting == "0":
        return []
    try:
        return [cpu_extension()]
    except ImportError:  # pybind11 missing (a build without isolation): NumPy fallback
        if setting == "1":
            raise
        print("WARNING: pybind11 is not installed; smolvlm_fast._cpu is not built (NumPy fallback)", file=sys.stderr)
        return []


def cuda_modules():
    setting = build_setting("SMOLVLM_FAST_BUILD_CUDA")
    if setting == "0":
        return []
    if find_nvcc() is None:
        if setting == "1":
            raise SystemExit("SMOLVLM_FAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME, or put nvcc on PATH)")
        return []  # no CUDA toolkit: the Triton kernels serve (the usual case without a GPU)
    return [cuda_extension()]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
