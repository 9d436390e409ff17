"""One function per op (contracts: smolvlm_fast/ops/README.md); each call runs the implementation that
ops/registry.py picks for it.

On CUDA tensors the CUDA kernel (csrc/cuda/, smolvlm_fast._C, through ops/cuda.py) runs the calls it covers, the
Triton kernel (smolvlm_fast.kernels) the calls it covers of the rest, the PyTorch reference (ops/reference.py) what
is left; elsewhere the reference. `use_kernels("triton,reference")` (or SMOLVLM_FAST_KERNELS, `kernels=`,
`--kernels`) sets that order for the whole process, every thread included. `explain(name, *args)` says which runs a
call and why; `python -m smolvlm_fast.env` lists what each op gets. `impl="reference"|"triton"|"cuda"` forces one for
a call; `with ops.prefer("triton"):` forces one for a block of code in this thread (the tests use it to run a whole
model through the kernels in Triton's CPU interpreter). The first call of each kind on a GPU is checked against the
reference (ops/selfcheck.py; SMOLVLM_FAST_SELF_CHECK=0 turns it off): a kernel that fails it is disabled, with one
KernelWarning.
"""
from __future__ import annotations

from .registry import (OPS, ORDER, TRITON_MODULES, KernelWarning, available, explain, implementations, kernel_order,
                       prefer, use_kernels)
from .registry import run as _run

__all__ = ["OPS", "ORDER", "TRITON_MODULES", "KernelWarning", "available", "cross_attention", "dwsep_patch_embed",
           "explain", "gelu_tanh", "implementations", "int4_gemm", "kernel_order", "layer_norm", "paged_attention",
           "patch_embed", "prefer", "rms_norm", "rope_attention", "rope_table", "silu_and_mul", "use_kernels",
           "write_kv_cache"]


def rms_norm(x, weight, eps, residual=None, *, impl=None):
    return _run("rms_norm", impl, x, weight, eps, residual)


def layer_norm(x, weight, bias, eps, *, impl=None):
    return _run("layer_norm", impl, x, weight, bias, eps)


def silu_and_mul(x, *, impl=None):
    return _run("silu_and_mul", impl, x)


def gelu_tanh(x, *, impl=None):
    return _run("gelu_tanh", impl, x)


def patch_embed(pixels, weight, bias, pos_embed, position_ids, *, groups=1, impl=None):
    return _run("patch_embed", impl, pixels, weight, bias, pos_embed, position_ids, groups=groups)


def dwsep_patch_embed(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids, *, impl=None):
    return _run("dwsep_patch_embed", impl, pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed,
                position_ids)


def rope_attention(q, k, v, *, impl=None, **kwargs):
    return _run("rope_attention", impl, q, k, v, **kwargs)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, impl=None, **kwargs):
    return _run("write_kv_cache", impl, k, v, k_cache, v_cache, slot_mapping, **kwargs)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, impl=None, **kwargs):
    return _run("paged_attention", impl, q, k_cache, v_cache, block_tables, seq_lens, **kwargs)


def cross_attention(q, k, v, *, impl=None, **kwargs):
    return _run("cross_attention", impl, q, k, v, **kwargs)


def int4_gemm(x, w, bias=None, *, impl=None):
    """x [M, K] @ W.T (+ bias) -> [M, N] in x's dtype, W an int4 weight (models/int4_linear.py: Int4Tensors; its
    layout in formats/int4.py)."""
    return _run("int4_gemm", impl, x, w, bias)


def rope_table(rotary_dim: int, max_position: int, theta: float, device=None):
    from .reference import rope_table as table
    return table(rotary_dim, max_position, theta, device=device)
