"""One function per op (shared/KERNELS.md); each picks an implementation for the tensors' device.

`impl="reference"|"triton"|"cuda"` forces one. Until the kernel issues land, only the PyTorch
reference is registered, so it serves every device.
"""
from __future__ import annotations

import functools

OPS = ("rms_norm", "layer_norm", "silu_and_mul", "gelu_tanh", "patch_embed", "dwsep_patch_embed", "rope_attention",
       "write_kv_cache", "paged_attention", "cross_attention")


@functools.cache
def _impls() -> dict[str, dict[str, object]]:
    """op name -> {impl name: function}, fastest first. Built on first use: importing smolvlm_fast.ops must not
    import torch (the NumPy path lives beside it in ops/numpy_ops.py)."""
    from . import reference
    return {name: {"reference": getattr(reference, name)} for name in OPS}


def available(name: str) -> list[str]:
    return list(_impls()[name])


def _pick(name: str, impl: str | None):
    impls = _impls()[name]
    if impl is None:
        return next(iter(impls.values()))
    if impl not in impls:
        raise ValueError(f"ops.{name}: implementation {impl!r} is not available (have {list(impls)})")
    return impls[impl]


def rms_norm(x, weight, eps, residual=None, *, impl=None):
    return _pick("rms_norm", impl)(x, weight, eps, residual)


def layer_norm(x, weight, bias, eps, *, impl=None):
    return _pick("layer_norm", impl)(x, weight, bias, eps)


def silu_and_mul(x, *, impl=None):
    return _pick("silu_and_mul", impl)(x)


def gelu_tanh(x, *, impl=None):
    return _pick("gelu_tanh", impl)(x)


def patch_embed(pixels, weight, bias, pos_embed, position_ids, *, groups=1, impl=None):
    return _pick("patch_embed", impl)(pixels, weight, bias, pos_embed, position_ids, groups=groups)


def dwsep_patch_embed(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids, *, impl=None):
    return _pick("dwsep_patch_embed", impl)(pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, position_ids)


def rope_attention(q, k, v, *, impl=None, **kwargs):
    return _pick("rope_attention", impl)(q, k, v, **kwargs)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, impl=None, **kwargs):
    return _pick("write_kv_cache", impl)(k, v, k_cache, v_cache, slot_mapping, **kwargs)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, *, impl=None, **kwargs):
    return _pick("paged_attention", impl)(q, k_cache, v_cache, block_tables, seq_lens, **kwargs)


def cross_attention(q, k, v, *, impl=None, **kwargs):
    return _pick("cross_attention", impl)(q, k, v, **kwargs)


def rope_table(rotary_dim: int, max_position: int, theta: float, device=None):
    from .reference import rope_table as table
    return table(rotary_dim, max_position, theta, device=device)
