"""The long fuzz run of the checkpoint readers (tests/test_fuzz_readers.py runs a few hundred examples in CI).

Mutates small valid GGUF and safetensors files (tests/hostile_files.py: integer header fields set to edge values,
hostile JSON values, byte flips, insertions, truncations) and reads each mutant with every consumer. A read must
succeed or raise CheckpointError from our own checks. Anything else is a finding, saved to --save-dir:
  crash    any other exception (MemoryError included: the address space is capped, see --memory-mb)
  missed   a library refused the file after our checks passed it (the readers' last-resort message)
  hang     one read ran past --timeout seconds (a watchdog, not a benchmark: the time is never asserted)
Exit status 1 when there is any finding.

    python bench/fuzz_readers.py --iterations 100000
    python bench/fuzz_readers.py --reader gguf --iterations 50000 --seed 7
"""
from __future__ import annotations

import argparse
import collections
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from smolvlm_fast.errors import CheckpointError  # noqa: E402
from tests.hostile_files import (MISSED_BY_CHECKS, gguf_fields, mutate_gguf, mutate_safetensors,  # noqa: E402
                                 read_gguf_everything, read_safetensors_everything, safetensors_bytes,
                                 safetensors_parts)


class Hang(Exception):
    pass


def readers(torch_path: bool):
    """name -> (file suffix, valid bytes, mutate(rng) -> bytes, read(path))."""
    fields = gguf_fields()
    valid_gguf = fields.to_bytes()
    header, data = safetensors_parts()
    return {
        "gguf": (".gguf", valid_gguf, lambda rng: mutate_gguf(rng, fields, valid_gguf), read_gguf_everything),
        "safetensors": (".safetensors", safetensors_bytes(header, data), lambda rng: mutate_safetensors(rng, header, data),
                        lambda path: read_safetensors_everything(path, torch_path)),
    }


def classify(read, path: Path, timeout: float) -> tuple[str, str]:
    """(outcome, detail): ok, refused (CheckpointError), or a finding: crash, missed, hang."""
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        read(path)
        return "ok", ""
    except CheckpointError as e:
        return ("missed", str(e)) if any(m in str(e) for m in MISSED_BY_CHECKS) else ("refused", "")
    except Hang:
        return "hang", f"ran past {timeout} s"
    except Exception as e:  # MemoryError included
        where = traceback.extract_tb(e.__traceback__)[-1]
        return "crash", f"{type(e).__name__}: {str(e)[:200]} at {where.filename}:{where.lineno}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def fuzz(name: str, reader, iterations: int, seed: int, timeout: float, folder: Path, save_dir: Path) -> int:
    suffix, valid, mutate, read = reader
    path = folder / f"mutant{suffix}"
    path.write_bytes(valid)
    assert classify(read, path, timeout)[0] == "ok", f"the valid {name} file does not load"
    rng, counts, first = random.Random(seed), collections.Counter(), {}
    start = time.perf_counter()
    for i in range(iterations):
        data = mutate(rng)
        path.write_bytes(data)
        outcome, detail = classify(read, path, timeout)
        counts[outcome] += 1
        if outcome not in ("ok", "refused") and detail not in first:
            first[detail] = i
            save_dir.mkdir(parents=True, exist_ok=True)
            (save_dir / f"{name}-{seed}-{i}{suffix}").write_bytes(data)
            print(f"  {name} #{i} {outcome}: {detail}", flush=True)
    findings = counts["crash"] + counts["missed"] + counts["hang"]
    print(f"{name}: {iterations} iterations in {time.perf_counter() - start:.0f} s (seed {seed}): {counts['ok']} loaded, "
          f"{counts['refused']} refused with CheckpointError, {counts['crash']} crashes, {counts['missed']} missed by "
          f"our checks, {counts['hang']} hangs", flush=True)
    return findings


def cap_memory(extra_mb: int) -> None:
    """Cap the address space at what the process maps now plus extra_mb: a blow-up becomes a MemoryError."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            limit = int(line.split()[1]) * 1024 + extra_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10000, help="mutants per reader")
    parser.add_argument("--reader", choices=["gguf", "safetensors", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one read may take before it is a hang")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space allowed above the start")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch safetensors path")
    parser.add_argument("--save-dir", type=Path, default=Path("bench/results/fuzz_findings"))
    args = parser.parse_args()

    def on_alarm(signum, frame):
        raise Hang

    signal.signal(signal.SIGALRM, on_alarm)
    warnings.simplefilter("ignore", RuntimeWarning)  # NaN scales in mutated tensor data: loading them is fine
    chosen = readers(not args.no_torch)
    names = list(chosen) if args.reader == "both" else [args.reader]
    findings = 0
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as folder:
        for name in names:  # the valid file is read first: imports happen before the cap
            suffix, valid, _, read = chosen[name]
            (Path(folder) / f"warm{suffix}").write_bytes(valid)
            read(Path(folder) / f"warm{suffix}")
        cap_memory(args.memory_mb)
        for name in names:
            findings += fuzz(name, chosen[name], args.iterations, args.seed, args.timeout, Path(folder), args.save_dir)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
