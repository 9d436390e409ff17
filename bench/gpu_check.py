"""The bring-up run of a CUDA machine, step by step within a time budget (bench/gpu_check.sh runs this).

Made for one cold H100 / H200 lent for minutes, with no network: preflight (driver, torch, nvcc, compute-sanitizer:
their versions) -> build smolvlm_fast._C for this GPU's architecture only -> the CUDA kernel tests' small cases ->
those under compute-sanitizer memcheck -> the other `gpu` tests but the Triton kernels' -> racecheck and synccheck
-> the Triton kernels' `gpu` tests -> short benchmarks (each bench's --quick: CUDA graphs against eager decode,
then CUDA, Triton and PyTorch, GB/s or TFLOP/s). The most telling steps come first, so a run cut short has still
done them. The test steps run one pinned Triton config per kernel (SMOLVLM_FAST_TRITON_CONFIGS=pinned): autotuning
every shape of the suite would take minutes; the benchmarks autotune.

Each step runs as its own process group under its own time limit (a hung step is killed, TERM then KILL); the
whole run has a deadline (GPU_CHECK_BUDGET_S, default 540 s), and a step that would start with less than
MIN_STEP_S left is skipped. After each step one JSON line is appended to <results>/gpu_check.jsonl (step, status
ok / failed / timeout / skipped, seconds, device, versions, log path, run id), and its output goes to
<results>/gpu_check_<step>.log; a run killed from outside still leaves the lines of the steps it finished.
<results> is GPU_CHECK_RESULTS_DIR, default bench/results.

Exit status: 0 when every step that ran passed (steps skipped for the deadline do not fail the run); 1 when a step
failed or timed out; 2 when there is no usable CUDA GPU: then the preflight line says so ("gpu": false) and nothing
else runs, so a CPU machine gets a clean, explained stop. `--dry-run` writes the preflight line and one "skipped"
line per step with its command and budget, runs nothing else and exits 0, with or without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 540
MIN_STEP_S = 15  # a step with less time than this left is skipped rather than started and killed
KILL_GRACE_S = 5  # between TERM and KILL of a step's process group


@dataclass
class Step:
    name: str
    budget_s: float  # its own limit; the run's deadline may cut it shorter
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Runner:
    """Runs steps one after another until the deadline, writing one JSON line per step."""
    results: Path
    deadline: float  # time.monotonic() value
    info: dict  # device and versions, copied into every line
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S"))
    failed: bool = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, step: str, status: str, seconds: float, **extra) -> dict:
        line = {"step": step, "status": status, "seconds": round(seconds, 1), "run": self.run_id, **self.info, **extra}
        self.results.mkdir(parents=True, exist_ok=True)
        with open(self.results / "gpu_check.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"== {step}: {status} ({seconds:.0f} s){'  ' + extra['log'] if 'log' in extra else ''}", flush=True)
        return line

    def run(self, step: Step) -> dict:
        limit = min(step.budget_s, self.remaining())
        if limit < MIN_STEP_S:
            return self.record(step.name, "skipped", 0.0, reason=f"{self.remaining():.0f} s left of the run's budget")
        log = self.results / f"gpu_check_{step.name}.log"
        start = time.monotonic()
        status, rc = run_limited(step.command, limit, log, {**os.environ, **step.env})
        self.failed |= status != "ok"
        line = self.record(step.name, status, time.monotonic() - start, rc=rc, limit_s=round(limit),
                           log=str(log.relative_to(ROOT) if log.is_relative_to(ROOT) else log))
        show_tail(log)
        return line


def run_limited(command: list[str], limit: float, log: Path, env: dict) -> tuple[str, int | None]:
    """(status, exit code) of command run for at most `limit` seconds, its output in log; on time out its whole
    process group (the pytest under compute-sanitizer, say) gets TERM, then KILL."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out.write(f"\n[gpu_check] stopped after its {limit:.0f} s limit\n")
            return "timeout", None
    return ("ok" if rc == 0 else "failed"), rc


def kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def show_tail(log: Path, lines: int = 4) -> None:
    for line in log.read_text(errors="replace").splitlines()[-lines:]:
        print(f"   | {line}")


# ---------------------------------------------------------------- preflight

PROBE = """
import json, platform
info = {"python": platform.python_version()}
try:
    import torch
    info["torch"], info["cuda"] = torch.__version__, torch.version.cuda
    info["gpu"] = torch.cuda.is_available()
    if info["gpu"]:
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability()
        torch.ones(1, device="cuda").add_(1).item()  # a kernel runs, not only the driver answers
except Exception as exc:
    info["gpu"], info["error"] = False, repr(exc)
for name in ("triton", "transformers"):
    try:
        info[name] = __import__(name).__version__
    except Exception:
        info[name] = None
print(json.dumps(info))
"""


def command_output(command: list[str]) -> str | None:
    """command's stdout, stripped; None where it is not installed or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def version_line(command: list[str]) -> str | None:
    """The last line of command's output that names a version (nvcc, compute-sanitizer)."""
    lines = [line.strip() for line in (command_output(command) or "").splitlines()
             if "version" in line.lower() or "release" in line.lower()]
    return lines[-1] if lines else None


def preflight(python: str) -> dict:
    """Device and versions: torch's view of the GPU (in a child process, so a hung driver cannot hang this one),
    nvidia-smi's driver, nvcc's and compute-sanitizer's versions."""
    try:
        probe = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120)
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        info = {"gpu": False, "error": f"torch probe failed: {exc!r}"}
    driver = command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["driver"] = driver.splitlines()[0] if driver else None
    info["nvcc"] = version_line([os.environ.get("NVCC", "nvcc"), "--version"])
    info["compute_sanitizer"] = version_line(["compute-sanitizer", "--version"])
    return info


# ---------------------------------------------------------------- the steps

TRITON_TESTS = ["tests/test_kernel_cross_attention.py", "tests/test_kernel_int4_gemm.py",
                "tests/test_kernel_paged_attention.py", "tests/test_kernel_patch_embed.py",
                "tests/test_kernel_rope_attention.py", "tests/test_kernel_write_kv_cache.py",
                "tests/test_kernels_small_ops.py"]
SMALL_CUDA = ["-m", "gpu", "-k", "small", "tests/test_cuda_kernels.py"]
# compute-sanitizer checks only our kernels (their mangled names hold the namespace smolvlm_cuda)
SANITIZE = ["compute-sanitizer", "--error-exitcode", "1", "--kernel-name", "regex:smolvlm_cuda", "--tool"]


def steps(python: str, arch: str) -> list[Step]:
    """The run after preflight, most telling first. arch: the GPU's capability ("9.0")."""
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--continue-on-collection-errors"]
    sanitizer = shutil.which("compute-sanitizer") is not None
    # without PyTorch's caching allocator every tensor is its own allocation: memcheck sees a read past its end
    no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    bench = [python]
    # the tests run one pinned Triton config per kernel: autotuning every shape of the suite takes minutes
    pinned = {"SMOLVLM_FAST_TRITON_CONFIGS": "pinned"}
    plan = [
        Step("build", 180, [python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
             {"SMOLVLM_FAST_BUILD_CUDA": "1", "SMOLVLM_FAST_BUILD_CPU": "0",
              "SMOLVLM_FAST_CUDA_ARCH": arch.replace(".", ""), "TORCH_CUDA_ARCH_LIST": arch}),
        Step("env", 30, [python, "-m", "smolvlm_fast.env"]),
        Step("cuda_kernels", 90, pytest + ["-x"] + SMALL_CUDA),
        Step("memcheck", 120, SANITIZE + ["memcheck", *pytest, *SMALL_CUDA], no_cache) if sanitizer else None,
        Step("gpu_tests", 150, pytest + ["-m", "gpu", "tests"] + [f"--ignore={t}" for t in TRITON_TESTS], pinned),
        Step("racecheck", 90, SANITIZE + ["racecheck", *pytest, *SMALL_CUDA]) if sanitizer else None,
        Step("synccheck", 60, SANITIZE + ["synccheck", *pytest, *SMALL_CUDA]) if sanitizer else None,
        Step("triton_tests", 120, pytest + ["-m", "gpu", *TRITON_TESTS], pinned),
        Step("bench_cuda_graphs", 60, bench + ["bench/bench_cuda_graphs.py", "--quick"]),
        Step("bench_paged_attention", 45, bench + ["bench/bench_paged_attention.py", "--quick"]),
        Step("bench_small_ops", 40, bench + ["bench/bench_small_ops.py", "--quick"]),
        Step("bench_int4_gemm", 45, bench + ["bench/bench_int4_gemm.py", "--quick"]),
        Step("bench_attention", 45, bench + ["bench/bench_attention.py", "--quick"]),
        Step("bench_patch_embed", 40, bench + ["bench/bench_patch_embed.py", "--quick"]),
        Step("cuda_vs_triton", 40, bench + ["bench/cuda_vs_triton.py"]),
        Step("bench_xattn", 60, bench + ["bench/bench_xattn.py", "--quick"]),
    ]
    return [s for s in plan if s is not None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="preflight, then list the steps without running them")
    args = p.parse_args(argv)
    start = time.monotonic()
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S))
    results = Path(os.environ.get("GPU_CHECK_RESULTS_DIR", ROOT / "bench" / "results")).resolve()
    python = os.environ.get("PYTHON", sys.executable)

    info = preflight(python)
    versions = {k: info.get(k) for k in ("python", "torch", "cuda", "triton", "transformers", "driver", "nvcc",
                                         "compute_sanitizer")}
    runner = Runner(results, start + budget, {"device": info.get("device"), "versions": versions})
    note = {} if info["gpu"] else {"reason": info.get("error", "no CUDA GPU: torch.cuda.is_available() is False")}
    runner.record("preflight", "ok" if info["gpu"] else "skipped", time.monotonic() - start, gpu=info["gpu"],
                  capability=info.get("capability"), budget_s=budget, **note)
    plan = steps(python, info.get("capability") or "9.0")
    if args.dry_run:
        for step in plan:
            runner.record(step.name, "skipped", 0.0, reason="dry run", budget_s=step.budget_s,
                          command=" ".join(step.command))
        return 0
    if not info["gpu"]:
        return 2
    for step in plan:
        runner.run(step)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
