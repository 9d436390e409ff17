"""Build script: the optional C++ extensions. Everything else is configured in pyproject.toml.

smolvlm_fast._cpu (csrc/cpu/, pybind11): the CPU int4 / int8 matrix products and decode attention. It is optional: if it does not
build, installation still succeeds (with a warning) and smolvlm_fast.quant falls back to NumPy.
    SMOLVLM_FAST_BUILD_CPU=0   skip it
    SMOLVLM_FAST_BUILD_CPU=1   a failed build is an error
It is compiled for the building machine (-march=native when the compiler takes it), so build it where it runs.

`pip install -e .` builds the .so into smolvlm_fast/ itself, so the editable install imports it.
"""
from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

CPU_SOURCES = ["csrc/cpu/bindings.cpp", "csrc/cpu/quant_gemm.cpp", "csrc/cpu/paged_attention.cpp",
               "csrc/cpu/decoder_step.cpp", "csrc/cpu/prefill_gemm.cpp"]
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
                             depends=["csrc/cpu/quant_gemm.h", "csrc/cpu/paged_attention.h", "csrc/cpu/decoder_step.h",
                                      "csrc/cpu/prefill_gemm.h"], extra_compile_args=CPU_FLAGS,
                             extra_link_args=["-pthread"], cxx_std=17)


# The CUDA extension (smolvlm_fast._C from csrc/*.cu, built with torch.utils.cpp_extension.CUDAExtension where
# nvcc exists) goes here, beside cpu_extension(), with its own SMOLVLM_FAST_BUILD_CUDA switch.


class OptionalBuildExt(build_ext):
    """Builds each extension; one that fails is skipped with a warning unless its switch says it is required."""

    def build_extension(self, ext):
        required = build_setting("SMOLVLM_FAST_BUILD_CPU") == "1"
        if ext.name == "smolvlm_fast._cpu" and self.compiler.compiler_type == "unix":
            flags = NATIVE_FLAGS if self._accepts(NATIVE_FLAGS) else []
            ext.extra_compile_args = list(ext.extra_compile_args) + flags
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, a missing compiler...
            if required:
                raise
            self.warn(f"could not build {ext.name} ({exc}); smolvlm_fast will use its NumPy fallback. "
                      f"Set SMOLVLM_FAST_BUILD_CPU=1 to make this an error.")
            print(f"WARNING: {ext.name} was not built: {exc}", file=sys.stderr)

    def run(self):
        try:
            super().run()
        except Exception as exc:
            if build_setting("SMOLVLM_FAST_BUILD_CPU") == "1":
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


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
