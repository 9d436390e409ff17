"""Build script. The CUDA extension (csrc/) is added here by the CUDA-kernels issue; until then
the package is pure Python and everything is configured in pyproject.toml."""
from setuptools import setup

setup()
