"""A llama.cpp GGUF file as a Hugging Face llama config, its weights under HF names, and its tokenizer.

GGUF stores a 2-D weight as rows of the HF [out, in] matrix; quantized rows are runs of blocks along `in`
(Q8_0: 32 int8 + fp16 scale; Q4_0 / Q4_1: 32 nibbles + fp16 scale (+ fp16 min)). llama.cpp's converter
permutes the rows of attn_q / attn_k for its interleaved RoPE; we permute them back for rotate-half RoPE.
Whole rows move, so quantized blocks stay intact: `gguf_weights` can keep them (keep_quantized) for the int4 and q8
kernels, or give every weight as float32.

The file itself is read by gguf_reader (the bounded header walk), the tokenizer built by gguf_tokenizer.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf.quants import dequantize

from ..config import ModelConfig
from ..errors import CheckpointError
from .gguf_reader import SUPPORTED_TYPES, GGUFFile, GGUFTensor, Q, open_gguf
from .gguf_tokenizer import read_tokenizer
from .int4 import Int4Weight, Q8Weight, from_gguf
from .layout import check_complete, check_tensor, tensor_shapes

if TYPE_CHECKING:
    from ..inputs.tokenizer import Tokenizer

QUANTIZED = (Q.Q4_0, Q.Q4_1, Q.Q8_0)  # the types keep_quantized keeps: the int4 and q8 formats take their blocks

# GGUF tensor name -> Hugging Face parameter name; "{i}" is the block (layer) index.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# HF config key -> GGUF metadata key ("llama." prefix added), for the keys that come from the architecture.
CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "rope.dimension_count",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "vocab_size": "vocab_size",
}
REQUIRED_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class GGUFCheckpoint:
    config: dict                    # like a Hugging Face llama config.json
    tensors: dict[str, np.ndarray]  # HF names, float32, HF shapes [out, in]
    tokenizer: Tokenizer


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    """Config, float32 weights and tokenizer (the PyTorch path)."""
    file = open_gguf(path)
    config = read_config(file)
    tensors = dict(gguf_weights(file, ModelConfig.from_dict(config, source=str(file.path)), keep_quantized=False))
    return GGUFCheckpoint(config, tensors, read_tokenizer(file.metadata, file.path))


def load_gguf_weights(path: str | Path, *, keep_quantized: bool) -> tuple[ModelConfig, dict]:
    """The model config and the weights under HF names (see gguf_weights for keep_quantized)."""
    file = open_gguf(path)
    config = ModelConfig.from_dict(read_config(file), source=str(file.path))
    return config, dict(gguf_weights(file, config, keep_quantized=keep_quantized))


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer (no tensors are read)."""
    file = open_gguf(path)
    return read_tokenizer(file.metadata, file.path)


# --- the config ---------------------------------------------------------------------------------------------------


def read_config(file: GGUFFile) -> dict:
    """A Hugging Face llama config.json from the llama.* and tokenizer.ggml.* metadata."""
    meta, path = file.metadata, file.path
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture {arch!r} is not supported (only 'llama')")
    config = {"model_type": "llama"}
    for hf_key, key in CONFIG_KEYS.items():
        if (value := meta.get(f"llama.{key}")) is not None:
            config[hf_key] = _config_value(hf_key, value, f"{path}: metadata field llama.{key}")
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise CheckpointError(f"{path}: missing metadata field llama.{CONFIG_KEYS[key]}")
    if config["num_hidden_layers"] > len(file.tensors):  # 9 tensors a layer: a huge count is a lie, not a loop
        raise CheckpointError(f"{path}: metadata field llama.block_count {config['num_hidden_layers']} but the file "
                              f"holds only {len(file.tensors)} tensors")
    heads = config["num_attention_heads"]
    config.setdefault("num_key_value_heads", heads)
    config.setdefault("head_dim", config["hidden_size"] // heads)
    config.setdefault("rms_norm_eps", 1e-5)
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("max_position_embeddings", 2048)
    config.setdefault("vocab_size", _vocab_size(file))
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in file.tensors)
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{key}"])
    return config


def _config_value(hf_key: str, value, where: str):
    """A number; sizes and counts positive integers below 2**31 (they size loops and arrays)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where} is {str(value)[:100]}, expected a number")
    if hf_key not in ("rms_norm_eps", "rope_theta") and not (isinstance(value, int) and 0 < value < 2**31):
        raise CheckpointError(f"{where} is {value!r}, expected an integer in 1..2**31-1")
    return _as_python(value)


def _as_python(value):
    """GGUF float32 fields as the decimal their config.json had (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _vocab_size(file: GGUFFile) -> int:
    if "tokenizer.ggml.tokens" in file.metadata:
        return len(file.metadata["tokenizer.ggml.tokens"])
    for t in file.tensors:
        if t.name == "token_embd.weight":
            return int(t.dims[-1])
    raise CheckpointError(f"{file.path}: no llama.vocab_size, tokenizer.ggml.tokens or token_embd.weight")


# --- the weights --------------------------------------------------------------------------------------------------


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name, or None if the table has none."""
    if m := re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name):
        template = TENSOR_NAMES.get("blk.{i}." + m[2])
        return template.format(i=int(m[1])) if template else None
    return TENSOR_NAMES.get(gguf_name)


def gguf_weights(file: GGUFFile, config: ModelConfig, *,
                 keep_quantized: bool) -> Iterator[tuple[str, np.ndarray | Int4Weight | Q8Weight]]:
    """(HF name, weight) for every tensor of the file, each name and shape checked against the config's layout
    before it is read, the set checked complete at the end. keep_quantized: Q4_0 / Q4_1 stay int4
    (int4.Int4Weight), Q8_0 stays q8 (int4.Q8Weight), F32 / F16 become float32; otherwise every weight is float32.

    A tensor's file pages are let go once it is converted (every weight is a copy), so a loader that holds the
    weights never also holds the whole file in resident memory."""
    path = file.path
    expected = tensor_shapes(config)
    seen = set()
    for t in file.tensors:
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} (not part of a llama model with this config)")
        check_tensor(name, t.shape, expected, f"{path} ({t.name})")
        weight = tensor_weight(file, t, config, keep_quantized)
        file.drop_pages(t)
        seen.add(name)
        yield name, weight
    check_complete(seen, expected, str(path))


def tensor_weight(file: GGUFFile, t: GGUFTensor, config: ModelConfig, keep_quantized: bool):
    """One tensor in its HF shape and row order: kept as int4 / q8 blocks, or float32; never a view of the file."""
    rows, qtype = raw_rows(file, t, config)
    if keep_quantized and qtype in QUANTIZED:
        return from_gguf(rows, qtype)
    w = dequantize(rows, qtype)
    if np.may_share_memory(w, file.file_bytes):  # F32 rows as stored: a view of the mapped file
        w = w.copy()
    return w.reshape(t.shape)


def raw_rows(file: GGUFFile, t: GGUFTensor, config: ModelConfig) -> tuple[np.ndarray, Q]:
    """The stored rows, q/k rows put back in HF (rotate-half) order: float arrays for F32/F16,
    uint8 [rows, blocks * block_bytes] when quantized (whole rows move, so every block stays intact)."""
    if t.type not in SUPPORTED_TYPES:  # the reader refuses them already; this keeps raw_rows safe on its own
        names = ", ".join(q.name for q in SUPPORTED_TYPES)
        raise CheckpointError(f"{file.path}: tensor {t.name} has type {t.type.name}, not supported (only {names})")
    rows = file.data(t)
    if (n_head := _rope_heads(t.name, config)) is not None:
        if rows.shape[0] % (2 * n_head):
            raise CheckpointError(f"{file.path}: tensor {t.name} has {rows.shape[0]} rows, not {n_head} heads of pairs")
        rows = rows[unpermute_rows(rows.shape[0], n_head)]
    return rows, t.type


def _rope_heads(gguf_name: str, config: ModelConfig) -> int | None:
    if gguf_name.endswith(".attn_q.weight"):
        return config.text.num_attention_heads
    if gguf_name.endswith(".attn_k.weight"):
        return config.text.num_key_value_heads
    return None


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permute: within each head, rows (pair, half) -> (half, pair)."""
    half = n_rows // n_head // 2
    # llama.cpp stored row (h, j, s) = HF row (h, s, j), j < half, s in {0, 1}
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)
