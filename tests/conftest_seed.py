"""Seeds for the tests' random inputs (imported into tests/conftest.py): every test draws from its own seed, and a
failing test's report prints that seed and the command that replays it.

A test's seed mixes the session seed with the test's node id: each test draws differently from the others and from
the last session (so the random tests keep exploring), yet the same node id on the same session seed draws the same
inputs whichever tests run beside it and in whatever order. The session seed is SMOLVLM_FAST_TEST_SEED when set,
else a fresh one.

Before each test, every generator a test may draw from without naming a seed is seeded from the test's seed:
NumPy's global one (np.random.rand and friends), torch's (torch.randn without a generator, CPU and CUDA), Python's
`random`, and the module-level `RNG` (a np.random.Generator) of every test module loaded, which their helpers share
(test_cpu_kernels draws its attention cases through test_cpu_attention's helper, so the test's own module is not
enough). A test that wants a generator of its own asks for the `rng` fixture (or `seed`, for the int). A test that
seeds its own generator with a fixed number keeps it.
"""
from __future__ import annotations

import hashlib
import os
import random
import secrets
import shlex
import sys
from functools import cache

import numpy as np
import pytest
import torch

SEED_VARIABLE = "SMOLVLM_FAST_TEST_SEED"
_TEST_SEED = pytest.StashKey[int]()
_TEST_RNG = pytest.StashKey[np.random.Generator]()


@cache
def session_seed() -> int:
    text = os.environ.get(SEED_VARIABLE, "").strip()
    if not text:
        return secrets.randbits(32)
    try:
        return int(text, 0)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VARIABLE} must be an integer, got {text!r}") from None


def seed_for(nodeid: str) -> int:
    """The test's seed: 32 bits (what np.random.seed takes) of a hash of the session seed and the node id."""
    digest = hashlib.sha256(f"{session_seed()}/{nodeid}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def replay_command(nodeid: str) -> str:
    return f"{SEED_VARIABLE}={session_seed()} python -m pytest {shlex.quote(nodeid)}"


@pytest.fixture(autouse=True)
def _seeded_randomness(request, monkeypatch) -> np.random.Generator:
    """Seeds the shared generators for this test (autouse, so the tests that never ask for a seed are covered)."""
    node = request.node
    seed = seed_for(node.nodeid)
    node.stash[_TEST_SEED] = seed
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    generator = node.stash[_TEST_RNG] = np.random.default_rng(seed)
    for module in _test_modules():
        if isinstance(getattr(module, "RNG", None), np.random.Generator):
            monkeypatch.setattr(module, "RNG", generator)  # the same stream as the `rng` fixture: one per test
    return generator


def _test_modules():
    """The modules of this test package loaded so far (tests.test_cpu_kernels, tests.test_cpu_attention, ...)."""
    package = __name__.rpartition(".")[0] + "."
    return [m for name, m in list(sys.modules.items()) if name.startswith(package)]


@pytest.fixture
def seed(request, _seeded_randomness) -> int:
    """This test's seed (see the module docstring)."""
    return request.node.stash[_TEST_SEED]


@pytest.fixture
def rng(_seeded_randomness) -> np.random.Generator:
    """A NumPy generator seeded with this test's seed."""
    return _seeded_randomness


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report gets a section with its seed and the command that replays it."""
    report = yield
    seed = item.stash.get(_TEST_SEED, None)
    if report.failed and seed is not None:
        report.user_properties.append(("random_seed", seed))
        report.sections.append(("random seed", f"seed {seed}; replay: {replay_command(item.nodeid)}\n"))
    return report


def pytest_report_header(config) -> str:
    how = "set" if os.environ.get(SEED_VARIABLE, "").strip() else "fresh this session"
    return f"random inputs: {SEED_VARIABLE}={session_seed()} ({how})"


def pytest_terminal_summary(terminalreporter) -> None:
    """The replay commands once more at the end, where CI logs are read (and with --tb=no, the only place)."""
    failed = [r for r in terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
              if any(name == "random_seed" for name, _ in getattr(r, "user_properties", ()))]
    if failed:
        terminalreporter.section("random seeds of the failures")
        for nodeid in dict.fromkeys(report.nodeid for report in failed):  # once for a failed call and teardown
            terminalreporter.write_line(replay_command(nodeid))
