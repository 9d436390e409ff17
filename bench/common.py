"""Helpers every benchmark shares: what ran where (device, versions, commit), timing, and result rows.

A result row is one JSON line in bench/results/<bench>.jsonl (fields in bench/README.md, "Result rows").
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


# ---------------------------------------------------------------- where and what

def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo (or the platform) names it, with the number of cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def device_name(device) -> str:
    """"NVIDIA H100 80GB HBM3" for a CUDA device, the CPU model and core count otherwise."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken (triton without a GPU driver, say)
        return None


@functools.cache
def versions() -> dict[str, str | None]:
    import torch

    import smolvlm_fast

    return {"smolvlm_fast": smolvlm_fast.__version__, "torch": torch.__version__, "triton": _version("triton"),
            "cuda": torch.version.cuda, "transformers": _version("transformers")}


@functools.cache
def git_commit() -> str | None:
    """HEAD of the repository, with "-dirty" when files other than the results differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


# ---------------------------------------------------------------- timing

def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device="cpu") -> float:
    """Seconds one call of fn takes, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_repeated(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, device="cpu") -> list[float]:
    """Seconds per call over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [time_call(fn, device) for _ in range(repeats)]


class CpuContention:
    """`with CpuContention() as c: ...`, then c.others: the share of all CPU time on the machine that other
    processes (or the hypervisor, as steal) used meanwhile. None where /proc/stat is missing (not Linux)."""

    def __enter__(self):
        self.start, self.others = self._snapshot(), None
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        if self.start and end:
            busy, total, own = (e - s for e, s in zip(end, self.start))
            self.others = max(0.0, (busy - own) / total) if total > 0 else None

    @staticmethod
    def _snapshot():
        """(busy s, total s over all CPUs, this process's CPU s)."""
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already counted in user
        t = os.times()
        return (total - idle) / tick, total / tick, t.user + t.system


def quiet_samples(fn: Callable[[], object], *, calls: int, repeats: int, warmup: int,
                  max_contention: float) -> list[float] | None:
    """Seconds per call of fn, one sample per `calls` calls, taken while other processes used at most
    max_contention of the CPU (3 tries, then None). /proc/stat counts in 10 ms ticks: make a sample longer than a
    few ticks."""
    for _ in range(3):
        for _ in range(warmup):
            fn()
        with CpuContention() as c:
            out = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                out.append((time.perf_counter() - start) / calls)
        if c.others is None or c.others <= max_contention:
            return out
        print(f"  (other processes used {c.others:.0%} of the CPU; measuring again)", file=sys.stderr)
    return None


def clean_rounds(impls: list[str], one: Callable[[str], object], repeats: int, args, what: str
                 ) -> tuple[list[dict], bool]:
    """([{impl: one(impl)} per round], whether unreliable). A round runs every impl once, alternating who goes
    first; a round during which other processes took more than --max-contention of the CPU is discarded and run
    again, up to 3 x repeats rounds in all."""
    clean, contended = [], []
    while len(clean) < repeats and len(clean) + len(contended) < 3 * repeats:
        order = impls if (len(clean) + len(contended)) % 2 == 0 else impls[::-1]
        with CpuContention() as contention:
            result = {key: one(key) for key in order}
        busy = contention.others is not None and contention.others > args.max_contention
        (contended if busy else clean).append(result)
    unreliable = len(clean) < repeats
    if contended:
        print(f"{what}: {len(contended)} of {len(clean) + len(contended)} rounds discarded: other processes took "
              f"more than {args.max_contention:.0%} of the CPU", file=sys.stderr)
    if unreliable:
        print(f"{what}: WARNING only {len(clean)} uncontended rounds of {repeats}: not reliable"
              f"{'' if args.no_save else ', so no rows are saved'}", file=sys.stderr)
    return (clean if not unreliable else clean + contended), unreliable

def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default percentile)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Stats:
    median: float
    p20: float
    p80: float

    @classmethod
    def of(cls, values: list[float]) -> "Stats":
        if not values:
            raise ValueError("no samples")
        return cls(quantile(values, 0.5), quantile(values, 0.2), quantile(values, 0.8))


# ---------------------------------------------------------------- rows

def make_row(*, bench: str, case: str, shape: str, dtype: str, device, metric: str, ours: list[float],
             baseline: str | None = None, theirs: list[float] | None = None, impl: str = "smolvlm_fast") -> dict:
    """One measurement. `ours` / `theirs` are samples in the metric's unit. ratio > 1 means we are faster:
    ours / baseline for a rate (tok/s, GB/s, TFLOP/s), baseline / ours for a time (ms)."""
    mine = Stats.of(ours)
    base = Stats.of(theirs) if theirs else None
    ratio = None
    if base is not None and mine.median > 0 and base.median > 0:
        ratio = base.median / mine.median if metric in ("ms", "s") else mine.median / base.median
    return {"bench": bench, "case": case, "shape": shape, "dtype": dtype, "impl": impl,
            "device": device_name(device), "versions": versions(), "commit": git_commit(), "metric": metric,
            "median": mine.median, "p20": mine.p20, "p80": mine.p80, "baseline": baseline,
            "baseline_median": base.median if base else None, "ratio": ratio,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def append_row(bench: str, row: dict, results_dir: Path | None = None) -> Path:
    """Append one JSON line to <results_dir>/<bench>.jsonl (created when missing)."""
    path = Path(results_dir or RESULTS) / f"{bench}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return path


def report(bench: str, row: dict, args) -> None:
    """Print a row, and append it to the results unless --no-save."""
    print(format_row(row))
    if not args.no_save:
        append_row(bench, row, args.results_dir)


def format_row(row: dict) -> str:
    """One human-readable line: case, metric, ours (the impl, when the row names one) against the baseline."""
    def num(x):
        return "-" if x is None else f"{x:,.1f}" if x >= 10 else f"{x:.3g}"
    ours = row.get("impl") or "ours"
    line = f"{row['case']:<44} {row['metric']:>5}  {ours} {num(row['median']):>9} [{num(row['p20'])}, {num(row['p80'])}]"
    if row.get("baseline"):
        line += f"  {row['baseline']} {num(row['baseline_median']):>9}  ratio {row['ratio']:.2f}x"
    return line


def bench_parser(doc: str):
    """An argparse parser described by the module docstring `doc` (first paragraph; the rest as epilog), with the
    options every benchmark takes: --no-save and --results-dir."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--no-save", action="store_true", help="print only; append no rows to the results file")
    p.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    return p


def add_model_run_options(p) -> None:
    """The options of the benchmarks that time whole model runs on the CPU against transformers."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-baseline", action="store_true", help="measure smolvlm_fast only, no transformers")
    p.add_argument("--max-contention", type=float, default=0.10,
                   help="rerun a round when other processes took more than this share of the CPU (default 0.10)")


def gpu_skipped(bench: str) -> bool:
    """True, after saying so, where there is no CUDA GPU: the GPU kernels are timed on a GPU only."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{bench}: skipped, no CUDA GPU (the Triton kernels are timed on a GPU only)")
    return True


def run_kernel_bench(bench: str, doc: str, cases: dict, measure, check, *, dtypes: list[str], argv=None) -> int:
    """The command line of a Triton-kernel benchmark: for each group of cases (`cases[name](dtype, device)`),
    check the kernel against its baselines, `measure(case) -> (metric, ours, {baseline: theirs})`, print and save a
    row per baseline. Skips (exit 0) where there is no CUDA GPU: the kernels are timed on a GPU only."""
    import torch

    p = bench_parser(doc)
    p.add_argument("--ops", nargs="+", choices=list(cases), default=list(cases))
    p.add_argument("--dtype", default=dtypes[0], choices=dtypes)
    args = p.parse_args(argv)
    if gpu_skipped(bench):
        return 0
    dtype, device = getattr(torch, args.dtype), "cuda"
    torch.manual_seed(0)
    for group in args.ops:
        for case in cases[group](dtype, device):
            check(case)
            metric, ours, baselines = measure(case)
            for baseline, theirs in baselines.items():
                row = make_row(bench=bench, case=case.op, shape=case.shape, dtype=args.dtype, device=device,
                               metric=metric, ours=ours, baseline=baseline, theirs=theirs, impl="triton")
                print(format_row({**row, "case": f"{case.op} {case.shape}"}))
                if not args.no_save:
                    append_row(bench, row, args.results_dir)
    return 0


QUICK_CASES = 2  # --quick: the first cases of each group, a bring-up run's smoke numbers (bench/gpu_check.py)


def take_quick(argv, cases: dict) -> tuple[list[str], dict]:
    """(argv without --quick, the case groups cut to their first QUICK_CASES cases when it was given)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quick" not in argv:
        return argv, cases
    argv.remove("--quick")
    return argv, {name: (lambda *a, group=group: itertools.islice(group(*a), QUICK_CASES))
                  for name, group in cases.items()}
