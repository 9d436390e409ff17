"""Decoder steps in one C++ call: every decoder layer of the NumPy model over a step's packed tokens, decode or
prefill (csrc/cpu/decoder_step.cpp, through smolvlm_fast._cpu.Decoder).

A decode step in NumPy is about ten calls per layer on rows of a few hundred floats; on a 2-core Xeon their Python
and NumPy overhead (~80 us a layer) was a third of the step, and in a prefill the small ops pass over memory
several times each. The C++ step runs the same layers (same weights, same cache, same metadata) with the products
and the attention on its thread pool. The embeddings (and image features), the vision encoder and the LM head stay
in models/smolvlm_numpy.py, whose free-function decoder remains the reference this is tested against. A model with
cross-attention layers (docs/xattn.md) runs as segments, one Decoder per run of layers between cross layers, with
the cross layers in NumPy between them (build_segments).
"""
from __future__ import annotations

import os

import numpy as np

from ..config import ModelConfig
from .linear import cpu_linear_spec
from .weights import GATE_UP, QKV, QKV_BIAS
from .native import _cpu  # None when the extension is not built: the NumPy code runs instead


def available() -> bool:
    """The extension has the fused step and SMOLVLM_FAST_FUSED is not 0."""
    return getattr(_cpu, "Decoder", None) is not None and os.environ.get("SMOLVLM_FAST_FUSED", "1") != "0"


def int8_activations_default() -> bool:
    """SMOLVLM_FAST_INT8_ACTIVATIONS=1: the fused step's int4 products round x to int8 per 32-element block, as
    llama.cpp does (about 2x faster products on a CPU with AVX512-VNNI, at ~1e-3 relative error in each product's
    output). Off by default: the default step matches the float32 reference to ~1e-6."""
    return os.environ.get("SMOLVLM_FAST_INT8_ACTIVATIONS", "0") == "1"


def build_decoder(weights: dict, config: ModelConfig, prefix: str, int8_activations: bool = False,
                  layers: range | None = None, final_norm: bool = True, bf16_prefill: bool = False):
    """The decoder's weights (HF names, q/k/v and gate/up already stacked by cpu/weights.py stack_projections)
    handed to C++ once: a _cpu.Decoder of `layers` (default all), ending in the final norm or (final_norm=False)
    in the whole hidden state; bf16_prefill: products of many rows (prefill) in bf16 where the CPU has bf16 dot
    products (precision "bfloat16"). Llama blocks only (partial rotary included: step() takes a [positions, rotary_dim]
    table); Phi blocks and cross-attention layers stay in models/smolvlm_numpy.py."""
    t = config.text
    specs = []
    for i in range(t.num_hidden_layers) if layers is None else layers:
        p = f"{prefix}layers.{i}."
        specs.append({
            "input_norm": _f32(weights[p + "input_layernorm.weight"]),
            "post_norm": _f32(weights[p + "post_attention_layernorm.weight"]),
            "qkv": cpu_linear_spec(weights[p + QKV], weights.get(p + QKV_BIAS)),
            "o": cpu_linear_spec(weights[p + "self_attn.o_proj.weight"]),
            "gate_up": cpu_linear_spec(weights[p + GATE_UP]),
            "down": cpu_linear_spec(weights[p + "mlp.down_proj.weight"]),
        })
    norm = _f32(weights[prefix + "norm.weight"]) if final_norm else None
    return _cpu.Decoder(specs, norm, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
                        t.rotary_dim, t.rms_norm_eps, t.head_dim**-0.5, int8_activations, bf16_prefill)


def build_segments(weights: dict, config: ModelConfig, prefix: str, int8_activations: bool = False,
                   bf16_prefill: bool = False) -> list:
    """[(layers, _cpu.Decoder)]: the decoder split after each cross_attention_layers index, so segment j is
    followed by cross layer j. The last segment ends in the final norm; where a cross layer comes after the last
    decoder layer there is no such segment, and the caller applies the final norm after that cross layer."""
    ends = [i + 1 for i in config.cross_attention_layers] + [config.text.num_hidden_layers]
    last = len(ends) - 1  # the segment after every cross layer: empty where the last layer has one
    return [(range(a, b), build_decoder(weights, config, prefix, int8_activations, range(a, b), final_norm=j == last,
                                        bf16_prefill=bf16_prefill))
            for j, (a, b) in enumerate(zip([0] + ends[:-1], ends)) if a < b]


def step_arrays(meta) -> tuple:
    """A step's metadata as the int32 arrays Decoder.step takes, converted once for every segment."""
    i32 = lambda v: np.ascontiguousarray(v, dtype=np.int32)
    return (i32(meta.positions), i32(meta.slot_mapping), i32(meta.block_tables), i32(meta.seq_lens),
            i32(meta.query_start_loc))


def step(decoder, x: np.ndarray, meta, kv_caches: list, cos_sin: np.ndarray) -> np.ndarray:
    """x [T, D] embeddings of the step's packed tokens -> final hidden states [T, D] (in place); meta: a
    StepMetadata or its step_arrays; kv_caches: the decoder's layers' (k_cache, v_cache) pairs, float32 or float16
    (the C++ step narrows the new K/V into a float16 cache, to nearest, and widens it as attention reads it)."""
    positions, slots, tables, seq_lens, starts = meta if isinstance(meta, tuple) else step_arrays(meta)
    x = np.ascontiguousarray(x, dtype=np.float32)
    decoder.step(x, kv_caches, positions, slots, tables, seq_lens, cos_sin, starts)
    return x


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)
