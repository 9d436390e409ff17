"""bench/gpu_check.sh and its step runner (bench/gpu_check.py), on the CPU: without a GPU the preflight says so in its
JSON line and the run stops with exit status 2; --dry-run lists the plan; the runner's limits, deadline and JSON
lines hold with stand-in steps (tiny Python commands)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "failed", "timeout", "skipped"}


def run_script(tmp_path: Path, *args: str, budget: int = 60) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ, GPU_CHECK_RESULTS_DIR=str(tmp_path), GPU_CHECK_BUDGET_S=str(budget), PYTHON=sys.executable)
    run = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    return run, read_lines(tmp_path)


def read_lines(results: Path) -> list[dict]:
    """Every line of gpu_check.jsonl, each one JSON object with the fields every step line has."""
    lines = [json.loads(text) for text in (results / "gpu_check.jsonl").read_text().splitlines()]
    for line in lines:
        assert {"step", "status", "seconds", "run", "device", "versions"} <= line.keys(), line
        assert line["status"] in STATUSES, line
    return lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_no_gpu_stops_after_preflight(tmp_path):
    run, lines = run_script(tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert [line["step"] for line in lines] == ["preflight"]
    (pre,) = lines
    assert pre["gpu"] is False and pre["status"] == "skipped" and "GPU" in pre["reason"]
    assert pre["versions"]["torch"] == torch.__version__ and pre["versions"]["python"]
    assert not list(tmp_path.glob("gpu_check_*.log"))  # no step ran


def test_dry_run_lists_the_plan(tmp_path):
    run, lines = run_script(tmp_path, "--dry-run")
    assert run.returncode == 0, run.stdout + run.stderr
    names = [line["step"] for line in lines]
    assert names[0] == "preflight" and names[1] == "build" and len(set(names)) == len(names)
    assert {"cuda_kernels", "gpu_tests", "triton_tests", "bench_paged_attention"} <= set(names)
    for line in lines[1:]:
        assert line["status"] == "skipped" and line["reason"] == "dry run" and line["command"]
    assert lines[0]["run"] == lines[-1]["run"]


def test_every_bench_step_has_a_quick_option():
    """The bench steps pass --quick: each of those scripts must take it (a typo there fails only on the GPU)."""
    for step in gpu_check.steps(sys.executable, "9.0"):
        if "--quick" in step.command:
            script = ROOT / step.command[1]
            text = script.read_text()
            assert "--quick" in text or "take_quick(" in text, script  # its own option, or bench.common's


@pytest.fixture
def runner(tmp_path, monkeypatch):
    """A Runner over tmp_path with a 60 s budget; stand-in steps may be as short as a second."""
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0.5)
    monkeypatch.setattr(gpu_check, "KILL_GRACE_S", 2)
    return gpu_check.Runner(tmp_path, gpu_check.time.monotonic() + 60, {"device": "test", "versions": {}})


def python_step(name: str, code: str, budget: float = 30) -> gpu_check.Step:
    return gpu_check.Step(name, budget, [sys.executable, "-c", code])


def test_step_statuses_and_logs(runner, tmp_path):
    assert runner.run(python_step("passes", "print('hello')"))["status"] == "ok"
    assert not runner.failed
    failed = runner.run(python_step("fails", "raise SystemExit(3)"))
    assert (failed["status"], failed["rc"]) == ("failed", 3) and runner.failed
    assert "hello" in (tmp_path / "gpu_check_passes.log").read_text()
    assert [line["status"] for line in read_lines(tmp_path)] == ["ok", "failed"]


def test_a_hung_step_is_killed_with_its_children(runner, tmp_path):
    """A step past its own limit is stopped, and so is what it started (its process group), as compute-sanitizer's
    pytest would be."""
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); child.wait()")
    line = runner.run(python_step("hangs", code, budget=10))
    log = (tmp_path / "gpu_check_hangs.log").read_text()
    assert (line["status"], line["rc"], runner.failed) == ("timeout", None, True), log
    assert "stopped after its 10 s limit" in log
    if pid_file.exists():  # else the child never started before the kill (a very loaded machine)
        assert not alive(int(pid_file.read_text()))


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie, dead but not yet reaped by its new parent, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_the_deadline_cuts_a_step_and_skips_the_rest(runner, tmp_path):
    runner.deadline = gpu_check.time.monotonic() + 3
    cut = runner.run(python_step("cut", "import time; time.sleep(600)", budget=100))
    assert cut["status"] == "timeout" and cut["limit_s"] <= 3  # the run's deadline, not the step's 100 s
    later = runner.run(python_step("later", "print('never')"))
    assert later["status"] == "skipped" and "left of the run's budget" in later["reason"]
    assert not (tmp_path / "gpu_check_later.log").exists()
    assert [line["step"] for line in read_lines(tmp_path)] == ["cut", "later"]


def test_quick_takes_the_first_cases_of_each_group():
    """The kernel benches' --quick (bench.common.take_quick, read before their shared parser sees the rest) keeps
    QUICK_CASES per group."""
    from bench import common
    groups = {"a": lambda dtype, device: iter(range(10)), "b": lambda dtype, device: iter("xyz")}
    argv, quick = common.take_quick(["--quick", "--ops", "a"], groups)
    assert argv == ["--ops", "a"]
    assert list(quick["a"](None, None)) == list(range(common.QUICK_CASES))
    assert list(quick["b"](None, None)) == list("xyz"[:common.QUICK_CASES])
    assert common.take_quick(["--ops", "a"], groups) == (["--ops", "a"], groups)
