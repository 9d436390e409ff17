"""Which autotuning space the Triton kernels search: the full one (the default), or one pinned config per kernel
(and per size class where a kernel prunes by it), with SMOLVLM_FAST_TRITON_CONFIGS=pinned.

Autotuning compiles and times every config of a space for every new key (shape class), which takes minutes over
a test suite's many shapes; the GPU bring-up (bench/gpu_check.py) must fit its time, so its test steps run the
pinned configs, each one a member of its kernel's full space. Read when a kernel module is imported (the
autotuner takes its configs then), so set it before that.
"""
from __future__ import annotations

import os

CONFIGS_ENV = "SMOLVLM_FAST_TRITON_CONFIGS"


def space(full: list, pinned: list) -> list:
    """full, or pinned where SMOLVLM_FAST_TRITON_CONFIGS=pinned."""
    value = os.environ.get(CONFIGS_ENV, "").strip().lower()
    if value not in ("", "full", "pinned"):
        raise ValueError(f"{CONFIGS_ENV}={value!r}: use full (autotune, the default) or pinned (one config each)")
    return pinned if value == "pinned" else full
