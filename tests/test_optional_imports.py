"""The test suite collects where an optional package is missing: a module that needs gguf skips (or only its tests
that need it do), it never fails collection. The GPU machines' image has torch and triton but no gguf, and a
collection error there stops `pytest -m gpu` before any GPU test runs.

gguf is hidden by a package of that name, first on PYTHONPATH, that raises ModuleNotFoundError as a missing one does.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pytest_without(tmp_path: Path, package: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m pytest *args` from the repository root with `package` made unimportable."""
    fake = tmp_path / "hidden" / package
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{package}' (hidden by "
                                      f"{Path(__file__).name})\", name={package!r})\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")])))
    env.pop("SMOLVLM_FAST_TEST_SEED", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_hidden_package_is_hidden(tmp_path):
    """The trick works: with the fake first on the path, importing gguf fails as a missing package does."""
    fake = tmp_path / "hidden" / "gguf"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'gguf'\", name='gguf')\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    run = subprocess.run([sys.executable, "-c", "import gguf"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "ModuleNotFoundError" in run.stderr


def test_suite_collects_without_gguf(tmp_path):
    run = pytest_without(tmp_path, "gguf", "--collect-only", "-q", "tests")
    out = run.stdout + run.stderr
    summary = run.stdout.strip().splitlines()[-1]  # "N tests collected in Ts", or "..., M errors in Ts"
    assert run.returncode == 0 and "error" not in summary, f"collection failed without gguf:\n{out[-3000:]}"
    # modules that need gguf only in some tests keep the others; test_gguf.py needs it throughout and skips
    assert "tests/test_quant.py::test_round_trip_within_half_a_step" in out
    if importlib.util.find_spec("smolvlm_fast._cpu") is not None:  # else test_cpu_kernels skips anyway
        assert "tests/test_cpu_kernels.py::test_int4_dequantize" in out
    assert "tests/test_gguf.py::" not in out


def test_gguf_tests_skip_without_gguf(tmp_path):
    """Running the tests that need gguf without it: they skip, none fails."""
    run = pytest_without(tmp_path, "gguf", "-q", "tests/test_quant.py", "-k", "gguf or q8 or round_trip")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert " skipped" in out and " passed" in out and "failed" not in out, out[-3000:]
