"""Read a llama.cpp GGUF file: a Hugging Face llama config, float32 tensors under HF names, and its tokenizer.

GGUF stores a 2-D weight as rows of the HF [out, in] matrix; quantized rows are runs of blocks along `in`
(Q8_0: 32 int8 + fp16 scale; Q4_0 / Q4_1: 32 nibbles + fp16 scale (+ fp16 min)). llama.cpp's converter
permutes the rows of attn_q / attn_k for its interleaved RoPE; we permute them back for rotate-half RoPE.
Whole rows move, so quantized blocks stay intact (`raw_rows` keeps them for the int4 path).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)

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

TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regex that splits text before BPE; None: GPT-2's own ByteLevel split.
# As transformers converts them (integrations/gguf/gguf_tokenizer_mapping.py). llama.cpp splits "smollm" text
# at every digit first; the two differ where a run of whitespace meets a digit ("\n\n1", "a  1").
PRE_TOKENIZER_SPLITS = {
    None: None, "default": None, "gpt2": None, "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
}


@dataclass
class GGUFCheckpoint:
    config: dict                    # like a Hugging Face llama config.json
    tensors: dict[str, np.ndarray]  # HF names, float32, HF shapes [out, in]
    tokenizer: Tokenizer


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    path = Path(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    config = read_config(meta, reader, path)
    tensors = read_tensors(reader, config, path)
    return GGUFCheckpoint(config, tensors, read_tokenizer(meta, path))


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer (no tensors are read)."""
    path = Path(path)
    return read_tokenizer(read_metadata(open_gguf(path)), path)


def open_gguf(path: Path) -> GGUFReader:
    """A GGUFReader over the file, every tensor checked to lie inside it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open GGUF file ({e.strerror or e})") from None
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails with ValueError/IndexError/KeyError on a cut or corrupt header
        raise CheckpointError(f"{path}: cannot read GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: tensor {t.name} runs past the end of the file (truncated?)")
    return reader


def read_metadata(reader: GGUFReader) -> dict:
    """Every key-value field, decoded to Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def read_config(meta: dict, reader: GGUFReader, path: Path) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture {arch!r} is not supported (only 'llama')")
    config = {"model_type": "llama"}
    for hf_key, key in CONFIG_KEYS.items():
        if (value := meta.get(f"llama.{key}")) is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CheckpointError(f"{path}: metadata field llama.{key} is {value!r}, expected a number")
            config[hf_key] = _as_python(value)
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise CheckpointError(f"{path}: missing metadata field llama.{CONFIG_KEYS[key]}")
    heads = config["num_attention_heads"]
    config.setdefault("num_key_value_heads", heads)
    config.setdefault("head_dim", config["hidden_size"] // heads)
    config.setdefault("rms_norm_eps", 1e-5)
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("max_position_embeddings", 2048)
    config.setdefault("vocab_size", _vocab_size(meta, reader, path))
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{key}"])
    return config


def _as_python(value):
    """GGUF float32 fields as the decimal their config.json had (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _vocab_size(meta: dict, reader: GGUFReader, path: Path) -> int:
    if "tokenizer.ggml.tokens" in meta:
        return len(meta["tokenizer.ggml.tokens"])
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            return int(t.shape[-1])
    raise CheckpointError(f"{path}: no llama.vocab_size, tokenizer.ggml.tokens or token_embd.weight")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name, or None if the table has none."""
    if m := re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name):
        template = TENSOR_NAMES.get("blk.{i}." + m[2])
        return template.format(i=int(m[1])) if template else None
    return TENSOR_NAMES.get(gguf_name)


def read_tensors(reader: GGUFReader, config: dict, path: Path) -> dict[str, np.ndarray]:
    from ..config import ModelConfig
    from .layout import check_complete, check_tensor, tensor_shapes

    expected = tensor_shapes(ModelConfig.from_dict(config, source=str(path)))
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} (not part of a llama model with this config)")
        check_tensor(name, hf_shape(t), expected, f"{path} ({t.name})")
        tensors[name] = load_tensor(t, config, path)
    check_complete(set(tensors), expected, str(path))
    return tensors


def hf_shape(t: ReaderTensor) -> tuple[int, ...]:
    """GGUF lists dims innermost first; HF lists them outermost first."""
    return tuple(int(d) for d in reversed(t.shape))


def raw_rows(t: ReaderTensor, config: dict, path: Path) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The stored rows, q/k rows put back in HF (rotate-half) order: float arrays for F32/F16,
    uint8 [rows, blocks * block_bytes] when quantized (whole rows move, so every block stays intact)."""
    if t.tensor_type not in SUPPORTED_TYPES:
        names = ", ".join(q.name for q in SUPPORTED_TYPES)
        raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, not supported (only {names})")
    rows = t.data
    if (n_head := _rope_heads(t.name, config)) is not None:
        if rows.shape[0] % (2 * n_head):
            raise CheckpointError(f"{path}: tensor {t.name} has {rows.shape[0]} rows, not {n_head} heads of pairs")
        rows = rows[unpermute_rows(rows.shape[0], n_head)]
    return rows, t.tensor_type


def _rope_heads(gguf_name: str, config: dict) -> int | None:
    if gguf_name.endswith(".attn_q.weight"):
        return config["num_attention_heads"]
    if gguf_name.endswith(".attn_k.weight"):
        return config["num_key_value_heads"]
    return None


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permute: within each head, rows (pair, half) -> (half, pair)."""
    half = n_rows // n_head // 2
    # llama.cpp stored row (h, j, s) = HF row (h, s, j), j < half, s in {0, 1}
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)


def load_tensor(t: ReaderTensor, config: dict, path: Path) -> np.ndarray:
    """One tensor as float32 in its HF shape."""
    rows, qtype = raw_rows(t, config, path)
    w = dequantize(rows, qtype)
    if qtype == Q.F32 and rows is t.data:
        w = w.copy()  # a view of the memory-mapped file otherwise
    return w.reshape(hf_shape(t))


def read_tokenizer(meta: dict, path: Path) -> Tokenizer:
    """The tokenizer the metadata describes, built the way transformers converts a GGUF tokenizer."""
    from ..tokenizer import Tokenizer

    backend = build_backend(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    return Tokenizer(backend, chat_template=meta.get("tokenizer.chat_template"), padding_side="left",
                     bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
                     pad_token=special("padding_token_id"), unk_token=special("unknown_token_id"))


def build_backend(meta: dict, path: Path):
    """A `tokenizers.Tokenizer` (byte-level BPE) from tokenizer.ggml.{model, pre, tokens, merges, token_type, ...}."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', byte-level BPE)")
    if pre not in PRE_TOKENIZER_SPLITS:
        known = ", ".join(sorted(p for p in PRE_TOKENIZER_SPLITS if p))
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {known})")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing metadata field {key}")
    for key in SPECIAL_ID_KEYS:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(meta["tokenizer.ggml.tokens"]):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key} {token_id} is not a token id")

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {byte_level_spelling(t): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    backend = Backend(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False))
    if (split := PRE_TOKENIZER_SPLITS[pre]) is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()

    special, user_defined = added_tokens(meta)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    backend.post_processor = bos_eos_processor(meta, tokens)
    return backend


def added_tokens(meta: dict) -> tuple[list[str], list[str]]:
    """(special, user-defined) tokens, matched whole in text: control tokens and the bos/eos/unk/pad ones are
    special, user-defined ones (like `<think>`) plain. A token outside the byte alphabet is no real vocabulary
    entry (a llama.cpp mislabel, as transformers puts it): skipped."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    named = {meta.get(f"tokenizer.ggml.{k}") for k in SPECIAL_ID_KEYS}
    spelled = [(i, t, kind) for i, (t, kind) in enumerate(zip(tokens, types)) if set(t) <= BYTE_ALPHABET]
    special = [t for i, t, kind in spelled if kind == TOKEN_TYPE_CONTROL or i in named]
    return special, [t for i, t, kind in spelled if kind == TOKEN_TYPE_USER_DEFINED and i not in named]


def bos_eos_processor(meta: dict, tokens: list[str]):
    """BOS/EOS around every encoding when tokenizer.ggml.add_bos_token / add_eos_token say so."""
    from tokenizers import processors

    bos = meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None
    eos = meta.get("tokenizer.ggml.eos_token_id") if meta.get("tokenizer.ggml.add_eos_token") else None
    if bos is None and eos is None:
        return None

    def around(seq: str, type_id: int) -> list[str]:
        return [f"{tokens[i]}:{type_id}" for i in (bos,) if i is not None] + [f"{seq}:{type_id}"] + \
               [f"{tokens[i]}:{type_id}" for i in (eos,) if i is not None]

    return processors.TemplateProcessing(single=around("$A", 0), pair=around("$A", 0) + around("$B", 1),
                                         special_tokens=[(tokens[i], i) for i in {bos, eos} - {None}])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the alphabet byte-level BPE tokens are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_TO_CHAR = _bytes_to_unicode()
BYTE_ALPHABET = frozenset(BYTE_TO_CHAR.values())


def byte_level_spelling(token: str) -> str:
    """A token already in the byte alphabet stays; one stored as plain text is spelled byte by byte."""
    return token if set(token) <= BYTE_ALPHABET else "".join(BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
