"""One function per op (shared/KERNELS.md); each picks an implementation for the tensors' device.

On CUDA tensors the CUDA kernel (csrc/cuda/, smolvlm_fast._C, through ops/cuda.py) runs where one exists and is
built, else the Triton kernel (smolvlm_fast.kernels), else the PyTorch reference; elsewhere the reference.
`impl="reference"|"triton"|"cuda"` forces one for a call; `with ops.prefer("triton"):` forces one for a
block of code (the tests use it to run a whole model through the kernels in Triton's CPU interpreter).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib

OPS = ("rms_norm", "layer_norm", "silu_and_mul", "gelu_tanh", "patch_embed", "dwsep_patch_embed", "rope_attention",
       "write_kv_cache", "paged_attention", "cross_attention", "int4_gemm")
# op -> the module of kernels/ that implements it in Triton
TRITON_MODULES = {"rms_norm": "rms_norm", "layer_norm": "layer_norm", "silu_and_mul": "activations",
                  "gelu_tanh": "activations", "write_kv_cache": "write_kv_cache", "rope_attention": "rope_attention",
                  "paged_attention": "paged_attention", "cross_attention": "cross_attention",
                  "int4_gemm": "int4_gemm", "patch_embed": "patch_embed", "dwsep_patch_embed": "patch_embed"}
_preferred: contextvars.ContextVar[str | None] = contextvars.ContextVar("smolvlm_fast_ops_preferred", default=None)


@functools.cache
def _impls() -> dict[str, dict[str, object]]:
    """op name -> {impl name: function}. Built on first use: importing smolvlm_fast.ops must not import torch
    (the NumPy path lives beside it in ops/numpy_ops.py)."""
    from . import reference
    table = {name: {"reference": getattr(reference, name)} for name in OPS}
    for name, module in TRITON_MODULES.items():
        try:
            kernel = getattr(importlib.import_module(f"smolvlm_fast.kernels.{module}"), name)
        except ImportError:  # triton not installed, or the kernel not written yet
            continue
        table[name]["triton"] = kernel
    from . import cuda
    if cuda.available():  # smolvlm_fast._C is built
        for name in cuda.OPS:
            table[name]["cuda"] = getattr(cuda, name)
    return table


def available(name: str) -> list[str]:
    return list(_impls()[name])


@contextlib.contextmanager
def prefer(impl: str | None):
    """Within the block, every op uses `impl` where it has one, whatever the device."""
    token = _preferred.set(impl)
    try:
        yield
    finally:
        _preferred.reset(token)


def _pick(name: str, impl: str | None, tensor):
    impls = _impls()[name]
    if impl is None:
        preferred = _preferred.get()
        order = (preferred,) if preferred else ("cuda", "triton") if tensor.is_cuda else ()
        return next((impls[i] for i in order if i in impls), impls["reference"])
    if impl not in impls:
        raise ValueError(f"ops.{name}: implementation {impl!r} is not available (have {list(impls)})")
    return impls[impl]


def rms_norm(x, weight, eps, residual=None, *, impl=None):
    return _pick("rms_norm", impl, x)(x, weight, eps, residual)


def layer_norm(x, weight, bias, eps, *, impl=None):
    return _pick("layer_norm", impl, x)(x, weight, bias, eps)


def silu_and_mul(x, *, impl=None):
    return _pick("silu_and_mul", impl, x)(x)


def gelu_tanh(x, *, impl=None):
    return _pick("gelu_tanh", impl, x)(x)


def patch_embed(pixels, weight, bias, pos_embed, position_ids, *, groups=1, impl=None):
    return _pick("patch_embed", impl, pixels)(pixels, weight, bias, pos_embed, position_ids, groups=groups)


def dwsep_patch_embed(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids, *, impl=None):
    return _pick("dwsep_patch_embed", impl, pixels)(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed,
                                                    position_ids)


def rope_attention(q, k, v, *, impl=None, **kwargs):
    return _pick("rope_attention", impl, q)(q, k, v, **kwargs)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, impl=None, **kwargs):
    return _pick("write_kv_cache", impl, k)(k, v, k_cache, v_cache, slot_mapping, **kwargs)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, impl=None, **kwargs):
    return _pick("paged_attention", impl, q)(q, k_cache, v_cache, block_tables, seq_lens, **kwargs)


def cross_attention(q, k, v, *, impl=None, **kwargs):
    return _pick("cross_attention", impl, q)(q, k, v, **kwargs)


def int4_gemm(x, w, bias=None, *, impl=None):
    """x [M, K] @ W.T (+ bias) with W an int4 weight (int4_linear.Int4Tensors) -> [M, N] in x's dtype."""
    return _pick("int4_gemm", impl, x)(x, w, bias)


def rope_table(rotary_dim: int, max_position: int, theta: float, device=None):
    from .reference import rope_table as table
    return table(rotary_dim, max_position, theta, device=device)
