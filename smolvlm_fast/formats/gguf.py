"""Read a llama.cpp GGUF file: a Hugging Face llama config, float32 tensors under HF names, and its tokenizer.

GGUF stores a 2-D weight as rows of the HF [out, in] matrix; quantized rows are runs of blocks along `in`
(Q8_0: 32 int8 + fp16 scale; Q4_0 / Q4_1: 32 nibbles + fp16 scale (+ fp16 min)). llama.cpp's converter
permutes the rows of attn_q / attn_k for its interleaved RoPE; we permute them back for rotate-half RoPE.
Whole rows move, so quantized blocks stay intact (`raw_rows` keeps them for the int4 path).

Files come from strangers, and lying headers (counts, lengths, dims, offsets) are how GGUF parsers get exploited.
`check_header` walks the header with struct alone, every count and length bounded by the bytes left in the file
before it is used, so gguf.GGUFReader only ever sees a well-formed file.
"""
from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..inputs.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)

# --- header limits (llama.cpp's gguf.cpp enforces the same) ---
GGUF_VERSIONS = (2, 3)
MAX_DIMS = 4                   # GGML_MAX_DIMS
MAX_NAME_BYTES = 63            # GGML_MAX_NAME is 64 with the terminating NUL
DEFAULT_ALIGNMENT = 32
# GGUFReader keeps numpy views per array element (0.7 KB for a number, 1.5 KB for a string): the sum over all arrays
# is capped so a small file cannot cost gigabytes. Real vocabularies need under 800k (Llama 3: 128k tokens + 280k
# merges + 128k types; Gemma: 3 x 256k; SmolLM2: 147k).
MAX_ARRAY_ELEMENTS = 1 << 20
INT64_MAX = 2**63 - 1
V = GGUFValueType
SCALAR_FORMATS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
                  V.FLOAT32: "f", V.BOOL: "B", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
MIN_VALUE_BYTES = {**{t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()}, V.STRING: 8}
INTS = (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)
# the value types of the keys we read: a value of another type is refused before anything reads it
KEY_TYPES = {
    "general.alignment": (V.UINT32,), "general.architecture": (V.STRING,),
    "tokenizer.ggml.model": (V.STRING,), "tokenizer.ggml.pre": (V.STRING,), "tokenizer.chat_template": (V.STRING,),
    "tokenizer.ggml.tokens": ((V.ARRAY, V.STRING),), "tokenizer.ggml.merges": ((V.ARRAY, V.STRING),),
    "tokenizer.ggml.token_type": tuple((V.ARRAY, t) for t in INTS),
    "tokenizer.ggml.add_bos_token": (V.BOOL,), "tokenizer.ggml.add_eos_token": (V.BOOL,),
    **{f"tokenizer.ggml.{k}": INTS for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")},
}

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
    """A GGUFReader over the file, once check_header has passed every field of it."""
    check_header(path)
    try:
        return GGUFReader(path)
    except Exception as e:  # never seen after check_header; the fuzz tests look for this message
        raise CheckpointError(f"{path}: GGUFReader failed on a checked header ({type(e).__name__}: {e})") from None


# --- the header walk ----------------------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    where: str      # "tensor 3 'blk.0.attn_q.weight'", for messages
    offset: int     # in the data section
    n_bytes: int


class _Cursor:
    """Little-endian fields of a mapped file, read in order; nothing is read past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, message: str):
        raise CheckpointError(f"{self.path}: {message}")

    def skip(self, n: int, what: str) -> int:
        if n > len(self.buf) - self.pos:
            self.fail(f"{what}: {n} bytes at offset {self.pos} run past the end of the {len(self.buf)}-byte file "
                      "(truncated?)")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.buf, self.skip(struct.calcsize(fmt), what))[0]

    def count(self, what: str, min_bytes: int) -> int:
        """A uint64 count of items of at least min_bytes each, bounded by the bytes left before anything loops on it."""
        n = self.unpack("Q", what)
        if n * min_bytes > len(self.buf) - self.pos:
            self.fail(f"{what} {n} needs at least {n * min_bytes} bytes but only {len(self.buf) - self.pos} remain "
                      "(corrupt or truncated?)")
        return n

    def string(self, what: str) -> str:
        start = self.skip(self.count(f"{what}: length", 1), what)
        try:
            return str(self.buf[start:self.pos], "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what}: not valid UTF-8")


def check_header(path: Path) -> list[TensorInfo]:
    """Walk the whole header, every rule of the format checked; CheckpointError naming the field at the first lie."""
    try:
        with open(path, "rb") as f:
            if (magic := f.read(4)) != GGUF_MAGIC:  # also keeps an empty file (which mmap refuses) out
                raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(_Cursor(buf, path))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open GGUF file ({e.strerror or e})") from None


def _walk(c: _Cursor) -> list[TensorInfo]:
    c.skip(4, "magic")
    if (version := c.unpack("I", "version")) not in GGUF_VERSIONS:
        c.fail(f"version {version} is not supported (only {' and '.join(map(str, GGUF_VERSIONS))})")
    n_tensors = c.unpack("Q", "n_tensors")
    n_kv = c.count("n_kv", 8 + 4 + 1)  # key length, value type, the smallest value
    if n_tensors * (8 + 4 + 8 + 4 + 8) > len(c.buf) - c.pos:  # name length, n_dims, one dim, type, offset
        c.fail(f"n_tensors {n_tensors} needs at least {n_tensors * 32} bytes but only {len(c.buf) - c.pos} remain "
               "(corrupt or truncated?)")
    meta, elements_left = {}, MAX_ARRAY_ELEMENTS
    for i in range(n_kv):
        key, value, n_elements = _read_kv(c, i, meta, elements_left)
        meta[key], elements_left = value, elements_left - n_elements
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        c.fail(f"metadata 'general.alignment' {alignment} is not a power of two")
    names: set[str] = set()
    tensors = [_read_tensor_info(c, i, names) for i in range(n_tensors)]
    _check_data(c, tensors, alignment)
    return tensors


def _read_kv(c: _Cursor, i: int, meta: dict, elements_left: int):
    """(key, value, array length): scalars decoded (only general.alignment is used), strings and arrays checked and
    skipped."""
    key = c.string(f"metadata key {i}")
    where = f"metadata key {i} {key[:100]!r}"
    if key in meta:
        c.fail(f"{where}: duplicate key")
    vtype = _value_type(c, c.unpack("I", f"{where}: value type"), where, array=True)
    signature = vtype
    if vtype == V.ARRAY:
        etype = _value_type(c, c.unpack("I", f"{where}: array element type"), f"{where}: array element", array=False)
        n = c.count(f"{where}: array length", MIN_VALUE_BYTES[etype])
        if n > elements_left:
            c.fail(f"{where}: array length {n} passes the limit of {MAX_ARRAY_ELEMENTS} array elements per file")
        for j in range(n if etype == V.STRING else 0):
            c.string(f"{where}[{j}]")
        c.skip(0 if etype == V.STRING else n * MIN_VALUE_BYTES[etype], f"{where}: array data")
        signature, value = (V.ARRAY, etype), None
    else:
        n = 0
        value = c.string(f"{where}: value") if vtype == V.STRING else c.unpack(SCALAR_FORMATS[vtype], f"{where}: value")
    if key in KEY_TYPES and signature not in KEY_TYPES[key]:
        c.fail(f"{where}: value type {_type_name(signature)} does not fit (expected "
               f"{' or '.join(_type_name(t) for t in KEY_TYPES[key])})")
    return key, value, n


def _value_type(c: _Cursor, raw: int, where: str, array: bool) -> GGUFValueType:
    if raw not in V._value2member_map_:
        c.fail(f"{where}: value type {raw} is unknown")
    if raw == V.ARRAY and not array:
        c.fail(f"{where}: arrays of arrays are not supported")
    return V(raw)


def _type_name(signature) -> str:
    return f"ARRAY of {signature[1].name}" if isinstance(signature, tuple) else signature.name


def _read_tensor_info(c: _Cursor, i: int, names: set[str]) -> TensorInfo:
    name = c.string(f"tensor {i}: name")
    where = f"tensor {i} {name[:100]!r}"
    if len(name.encode()) > MAX_NAME_BYTES:
        c.fail(f"{where}: name is {len(name.encode())} bytes, the limit is {MAX_NAME_BYTES}")
    if name in names:
        c.fail(f"{where}: duplicate tensor name")
    names.add(name)
    n_dims = c.unpack("I", f"{where}: n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(f"{where}: n_dims {n_dims} out of range 1..{MAX_DIMS}")
    dims = [c.unpack("Q", f"{where}: dim {j}") for j in range(n_dims)]
    if any(d > INT64_MAX for d in dims):
        c.fail(f"{where}: dims {dims}: a dim is negative as int64")
    raw_type = c.unpack("I", f"{where}: type")
    if raw_type not in Q._value2member_map_ or Q(raw_type) not in GGML_QUANT_SIZES:
        c.fail(f"{where}: type {raw_type} is unknown")
    if (qtype := Q(raw_type)) not in SUPPORTED_TYPES:
        c.fail(f"{where}: type {qtype.name} is not supported (only {', '.join(q.name for q in SUPPORTED_TYPES)})")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    # NumPy refuses a shape whose dims other than 0 multiply past int64, in elements or bytes, even with a 0 in it
    if math.prod(d or 1 for d in dims) * block_bytes > INT64_MAX:
        c.fail(f"{where}: dims {dims}: the element count overflows int64")
    if dims[0] % block:
        c.fail(f"{where}: row length {dims[0]} is not a multiple of {qtype.name}'s block size {block}")
    offset = c.unpack("Q", f"{where}: data offset")
    return TensorInfo(where, offset, math.prod(dims) // block * block_bytes)


def _check_data(c: _Cursor, tensors: list[TensorInfo], alignment: int) -> None:
    """Tensor data: aligned, in header order, one after another (each padded to the alignment), inside the file."""
    start = -(-c.pos // alignment) * alignment
    position = 0
    for t in tensors:
        if t.offset % alignment:
            c.fail(f"{t.where}: data offset {t.offset} is not a multiple of general.alignment {alignment}")
        if t.offset != position:
            what = "overlaps the previous tensor" if t.offset < position else "leaves a gap after the previous tensor"
            c.fail(f"{t.where}: data offset {t.offset} {what} (expected {position})")
        if start + t.offset + t.n_bytes > len(c.buf):
            c.fail(f"{t.where}: data [{start + t.offset}, {start + t.offset + t.n_bytes}) runs past the end of the "
                   f"{len(c.buf)}-byte file (truncated?)")
        position = t.offset + -(-t.n_bytes // alignment) * alignment


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
            config[hf_key] = _config_value(hf_key, value, f"{path}: metadata field llama.{key}")
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise CheckpointError(f"{path}: missing metadata field llama.{CONFIG_KEYS[key]}")
    if config["num_hidden_layers"] > len(reader.tensors):  # 9 tensors a layer: a huge count is a lie, not a loop
        raise CheckpointError(f"{path}: metadata field llama.block_count {config['num_hidden_layers']} but the file "
                              f"holds only {len(reader.tensors)} tensors")
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
    from ..inputs.tokenizer import Tokenizer

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

    try:  # the tokenizers library refuses bad vocabularies and merges with its own exceptions
        return _backend(meta, pre)
    except Exception as e:
        raise CheckpointError(f"{path}: the tokenizer in tokenizer.ggml.* cannot be built ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


def _backend(meta: dict, pre: str | None):
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

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
