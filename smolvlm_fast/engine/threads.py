"""One right-sized set of compute threads per process: the C++ pool (csrc/cpu/thread_pool.cpp) and torch's
intra-op pool both sized to the CPUs this process may run on.

The C++ pool sizes itself (SMOLVLM_FAST_NUM_THREADS, else sched_getaffinity). torch sizes its pool when it is
first used, from the CPUs it could see then; a process whose affinity was narrowed after that (or a torch that
counts every core) runs more threads than CPUs, and two pools that each think they own every CPU oversubscribe
them (torch's OpenMP workers spin at their barriers: decode measured 0.8 tokens/s with another process on a core).
So at load (once per process) torch's count is lowered to ours, unless it is the user's:
- OMP_NUM_THREADS or MKL_NUM_THREADS is set (torch reads them): theirs, left alone;
- torch's count is at most ours: left alone (fewer threads is the user's torch.set_num_threads, or torch's own
  choice of physical cores on an SMT machine: neither oversubscribes);
- torch's count is above ours: lowered. torch does not say whether torch.set_num_threads was called, and a count
  above the CPUs we may use oversubscribes them either way, so an explicit count that high is lowered too.
torch is never imported here: only a torch that is in sys.modules already is sized.
"""
from __future__ import annotations

import os
import sys

USER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_torch_sized = False


def affinity_cpus() -> int:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_threads() -> int:
    """The C++ pool's size, or (no extension) what it would be: SMOLVLM_FAST_NUM_THREADS, else the affinity."""
    from ..cpu.native import _cpu

    if _cpu is not None:
        return int(_cpu.get_num_threads())
    try:
        n = int(os.environ.get("SMOLVLM_FAST_NUM_THREADS", "0"))
    except ValueError:
        n = 0
    return n if n > 0 else affinity_cpus()


def size_torch_threads() -> str:
    """Lower torch's intra-op threads to cpu_threads() where torch is imported and the count is not the user's
    (the module's docstring); once per process. Returns what was done, for the log and the tests."""
    global _torch_sized
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "set_num_threads"):
        return "torch not imported"
    if _torch_sized:
        return "sized already"
    _torch_sized = True
    user = [name for name in USER_THREAD_VARIABLES if os.environ.get(name)]
    if user:
        return f"left at {torch.get_num_threads()} ({user[0]} is set)"
    have, want = torch.get_num_threads(), cpu_threads()
    if have <= want:
        return f"left at {have} (at most {want})"
    torch.set_num_threads(want)
    return f"lowered from {have} to {want}"
