"""The PyTorch-free path's weights: loading a checkpoint (safetensors or GGUF) into a dict under the Hugging Face
names, int4 quantization at load, and the stacked q/k/v and gate/up projections that the NumPy layers and the C++
decoder (cpu/decoder.py) both read, under the names defined here."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError, InputError
from ..formats.bf16 import Bf16Bits, Bf16Weight, bf16_rows, pack_bf16, pack_bf16_bits, stack_bf16
from ..formats.int4 import Int4Weight, Q8Weight, dequantize, quantize_int4, quantize_q8
from ..formats.layout import check_complete, check_tensor, tensor_shapes


def text_prefix(config: ModelConfig) -> str:
    return config.text_prefix


QKV, QKV_BIAS, GATE_UP = "self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias", "mlp.gate_up_proj.weight"




def load_safetensors_weights(model_dir: Path, config: ModelConfig, bf16_packed: frozenset[str] = frozenset(),
                             bf16_bits: frozenset[str] = frozenset(), int4: frozenset[str] = frozenset()) -> dict:
    """The checkpoint's tensors as float32 (float32 ones stay views of the memory-mapped file); the BF16 ones named
    in bf16_packed straight into packed bf16 (formats/bf16.py), those in bf16_bits as their bits (Bf16Bits, for
    the vision packing to widen one at a time), and those in int4 quantized as they are read (quantize_one), without
    a float32 copy of them all on the way."""
    from ..formats.safetensors import bf16_to_float32, load_checkpoint_numpy

    expected = tensor_shapes(config)

    def keep(name, bits):
        if name in bf16_packed and bits.ndim == 2:
            return pack_bf16_bits(bits)
        if name in int4:
            return quantize_one(name, bf16_to_float32(bits), config)
        return Bf16Bits(bits) if name in bf16_bits else None

    weights = {}
    for name, array in load_checkpoint_numpy(model_dir, _bf16_or_float32(keep)).items():
        if name not in expected:
            continue  # e.g. rotary inv_freq buffers or a tied lm_head copy
        check_tensor(name, array.shape, expected, str(model_dir))
        if isinstance(array, (Bf16Weight, Bf16Bits, Int4Weight, Q8Weight)):
            weights[name] = array
            continue
        if array.dtype.kind != "f":
            raise CheckpointError(f"{model_dir}: tensor {name} has dtype {array.dtype}, expected a float type")
        weights[name] = array.astype(np.float32, copy=False)
    check_complete(set(weights), expected, str(model_dir))
    return weights


def _bf16_or_float32(keep):
    """read_safetensors' bf16 hook: keep(name, bits), or the float32 values where it gives None."""
    from ..formats.safetensors import bf16_to_float32

    return lambda name, bits: keep(name, bits) or bf16_to_float32(bits)


def load_gguf_weights(path: Path) -> tuple[ModelConfig, dict]:
    """A GGUF file's config and weights under HF names, as the C++ kernels take them: Q4_0/Q4_1 stay int4, Q8_0
    stays q8, F32/F16 -> float32 (formats/gguf.py's one weight loop, keeping the quantized blocks)."""
    from ..formats.gguf import load_gguf_weights as load

    return load(path, keep_quantized=True)


DECODER_LINEARS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


PHI_LINEARS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.dense.weight", "mlp.fc1.weight", "mlp.fc2.weight")


CROSS_LINEARS = ("cross_attn.q_proj.weight", "cross_attn.k_proj.weight", "cross_attn.v_proj.weight",
                 "cross_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def decoder_linears(config: ModelConfig) -> list[str]:
    """Every linear weight of the text decoder (its blocks and cross-attention layers) by name; not the lm_head."""
    prefix, t = text_prefix(config), config.text
    block = PHI_LINEARS if t.architecture == "phi" else DECODER_LINEARS
    names = [f"{prefix}layers.{i}.{suffix}" for i in range(t.num_hidden_layers) for suffix in block]
    return names + [f"{prefix}cross_layers.{j}.{suffix}" for j in range(len(config.cross_attention_layers))
                    for suffix in CROSS_LINEARS]


def quantize_weights(weights: dict, config: ModelConfig, method: str) -> dict:
    """quantize="int4": the decoder's float linear weights to int4 (group 64, or 32 where K % 64 != 0; a weight
    whose K is no multiple of 32 stays float), and its LM head (lm_head, or the tied embedding) to Q8_0, as
    llama.cpp's Q4 files store it: the head is the largest single product of a decode step (49,280 x 576 for
    SmolVLM: 113 MB in float32, 30 MB in Q8_0), and int8 with a scale per 32 puts every weight within 1/254 of its
    block's largest magnitude (int4: 1/16 of the block's range)."""
    out = dict(weights)
    for name in quantized_names(config, method):
        if isinstance(weights.get(name), np.ndarray):
            out[name] = quantize_one(name, weights[name], config)
    return out


def quantized_names(config: ModelConfig, method: str) -> list[str]:
    """The weights quantize=method quantizes: the decoder's linears and its LM head."""
    if method != "int4":
        raise InputError(f"quantize={method!r} is not supported (only 'int4')")
    return [*decoder_linears(config), head_name(config)]


def quantize_one(name: str, w: np.ndarray, config: ModelConfig):
    """One weight of quantized_names [N, K] float32: the head Q8_0, a linear int4; w itself where K % 32 != 0."""
    if w.ndim != 2 or w.shape[1] % 32:
        return w
    if name == head_name(config):
        return quantize_q8(w)
    return quantize_int4(w, group_size=64 if w.shape[1] % 64 == 0 else 32)


def bf16_weights(weights: dict, config: ModelConfig) -> dict:
    """precision "bfloat16": the decoder's float linear weights and its LM head packed as bf16 (formats/bf16.py),
    the float32 copies dropped: half the bytes a decode step reads, and what the bf16 products take as they are.
    The released SmolVLM checkpoints are bf16, so for them this is the checkpoint's own values. Norms,
    embeddings (unless tied to the head) and biases stay float32."""
    out = dict(weights)
    for name in [*decoder_linears(config), head_name(config)]:
        w = weights.get(name)
        if isinstance(w, np.ndarray) and np.issubdtype(w.dtype, np.floating):
            out[name] = pack_bf16(w)
    return out


def head_name(config: ModelConfig) -> str:
    """The LM head's weight: lm_head.weight, or the input embedding where the checkpoint ties them."""
    return text_prefix(config) + "embed_tokens.weight" if config.text.tie_word_embeddings else "lm_head.weight"


def stack_projections(weights: dict, config: ModelConfig) -> dict:
    """Add each decoder layer's q/k/v rows stacked as self_attn.qkv_proj (and its bias) and gate/up rows as
    mlp.gate_up_proj (Llama blocks and cross-attention layers): one product instead of three and two. The
    checkpoint's names stay, as views of the stack."""
    weights = dict(weights)
    prefix = text_prefix(config)
    gate_up = {GATE_UP: ["mlp.gate_proj.weight", "mlp.up_proj.weight"]}
    layers = [(f"{prefix}cross_layers.{j}.", dict(gate_up)) for j in range(len(config.cross_attention_layers))]
    for i in range(config.text.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        groups = {QKV: ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]}
        if config.text.architecture == "llama":
            groups |= gate_up
        if p + "self_attn.q_proj.bias" in weights:
            groups[QKV_BIAS] = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        layers.append((p, groups))
    for p, groups in layers:
        for stacked, names in groups.items():
            if p + stacked in weights:
                continue
            weights[p + stacked] = stack_rows([weights[p + n] for n in names])
            start = 0
            for name in names:
                rows = weights[p + name].shape[0]
                weights[p + name] = row_slice(weights[p + stacked], start, start + rows)
                start += rows
    return weights


def stack_rows(parts: list):
    """Weights [N_i, K] of one kind -> [sum N_i, K] of that kind; mixed kinds (a GGUF with Q8_0 v next to Q4 q and k)
    are stacked as float32."""
    first = parts[0]
    if all(isinstance(w, Bf16Weight) for w in parts):
        return stack_bf16(parts)
    if all(isinstance(w, np.ndarray) for w in parts):
        return np.concatenate([np.asarray(w, dtype=np.float32) for w in parts])
    same = lambda attr: all(type(w) is type(first) and getattr(w, attr) == getattr(first, attr) for w in parts)
    if isinstance(first, Int4Weight) and same("K") and same("group_size") and same("symmetric"):
        return Int4Weight(sum(w.N for w in parts), first.K, first.group_size, first.symmetric,
                          np.concatenate([w.qweight for w in parts]), np.concatenate([w.scales for w in parts]),
                          None if first.symmetric else np.concatenate([w.mins for w in parts]))
    if isinstance(first, Q8Weight) and same("K"):
        return Q8Weight(sum(w.N for w in parts), first.K, np.concatenate([w.q for w in parts]),
                        np.concatenate([w.scales for w in parts]))
    return np.concatenate([dequantize(w) for w in parts])


def row_slice(w, start: int, stop: int):
    """Rows [start, stop) of a weight, as a view of it (of bf16 rows not from a multiple of 16 on: a copy)."""
    if isinstance(w, Bf16Weight):
        return bf16_rows(w, start, stop)
    if isinstance(w, Int4Weight):
        return Int4Weight(stop - start, w.K, w.group_size, w.symmetric, w.qweight[start:stop], w.scales[start:stop],
                          None if w.mins is None else w.mins[start:stop])
    if isinstance(w, Q8Weight):
        return Q8Weight(stop - start, w.K, w.q[start:stop], w.scales[start:stop])
    return w[start:stop]
