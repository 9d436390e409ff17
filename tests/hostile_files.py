"""Small valid checkpoints, built field by field, and the mutations that turn them hostile.

As llama.cpp's tests/test-gguf.cpp does: write a valid file with a writer of our own that records every header
field (label, struct format, value), then corrupt one field at a time in place, or mutate at random (the fuzz
tests and bench/fuzz_readers.py share `mutate_gguf` / `mutate_safetensors`).
"""
from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest

pytest.importorskip("gguf")  # its types name the fields written here; a module importing this one skips without it
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402
from gguf.quants import quantize  # noqa: E402

# --- GGUF ---------------------------------------------------------------------------------------------------------

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 32, 32, 2, 1, 16
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "h", "e", "l", "o", "he", "ll", "hell", "hello"]
MERGES = ["h e", "l l", "he ll", "hell o"]
ALIGNMENT = 32
SCALAR_FORMATS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
                  V.FLOAT32: "f", V.BOOL: "B", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


def gguf_kvs() -> list[tuple[str, object, object]]:
    """(key, value type, value) of a one-layer llama with a byte-level BPE tokenizer; arrays are (V.ARRAY, elem)."""
    u32, f32, s = V.UINT32, V.FLOAT32, V.STRING
    return [
        ("general.architecture", s, "llama"), ("general.alignment", u32, ALIGNMENT),
        ("llama.block_count", u32, 1), ("llama.context_length", u32, 64), ("llama.embedding_length", u32, HIDDEN),
        ("llama.feed_forward_length", u32, INTER), ("llama.attention.head_count", u32, HEADS),
        ("llama.attention.head_count_kv", u32, KV_HEADS), ("llama.rope.dimension_count", u32, HEAD_DIM),
        ("llama.rope.freq_base", f32, 10000.0), ("llama.attention.layer_norm_rms_epsilon", f32, 1e-5),
        ("tokenizer.ggml.model", s, "gpt2"), ("tokenizer.ggml.pre", s, "smollm"),
        ("tokenizer.ggml.tokens", (V.ARRAY, s), TOKENS),
        ("tokenizer.ggml.token_type", (V.ARRAY, V.INT32), [3, 3, 3] + [1] * (len(TOKENS) - 3)),
        ("tokenizer.ggml.merges", (V.ARRAY, s), MERGES),
        ("tokenizer.ggml.bos_token_id", u32, 1), ("tokenizer.ggml.eos_token_id", u32, 2),
        ("tokenizer.ggml.add_bos_token", V.BOOL, False), ("tokenizer.chat_template", s, "{{ messages }}"),
    ]


def gguf_tensors(seed: int = 0) -> list[tuple[str, Q, list[int], bytes]]:
    """(name, type, dims innermost first, data): every supported type once or more."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (Q.F16, (len(TOKENS), HIDDEN)), "output_norm.weight": (Q.F32, (HIDDEN,)),
              "blk.0.attn_norm.weight": (Q.F32, (HIDDEN,)), "blk.0.ffn_norm.weight": (Q.F32, (HIDDEN,)),
              "blk.0.attn_q.weight": (Q.Q8_0, (HEADS * HEAD_DIM, HIDDEN)),
              "blk.0.attn_k.weight": (Q.Q4_0, (KV_HEADS * HEAD_DIM, HIDDEN)),
              "blk.0.attn_v.weight": (Q.Q4_1, (KV_HEADS * HEAD_DIM, HIDDEN)),
              "blk.0.attn_output.weight": (Q.Q8_0, (HIDDEN, HEADS * HEAD_DIM)),
              "blk.0.ffn_gate.weight": (Q.Q4_0, (INTER, HIDDEN)), "blk.0.ffn_up.weight": (Q.F16, (INTER, HIDDEN)),
              "blk.0.ffn_down.weight": (Q.F32, (HIDDEN, INTER))}
    tensors = []
    for name, (qtype, shape) in shapes.items():
        w = rng.standard_normal(shape).astype(np.float32)
        data = w.astype(np.float16) if qtype == Q.F16 else w if qtype == Q.F32 else quantize(w, qtype)
        tensors.append((name, qtype, list(reversed(shape)), data.tobytes()))
    return tensors


class Fields(list):
    """The file as a list of [label, struct format or None for raw bytes, value]."""

    def add(self, label: str, fmt: str | None, value) -> None:
        self.append([label, fmt, value])

    def string(self, label: str, text: str | bytes) -> None:
        raw = text.encode() if isinstance(text, str) else text
        self.add(label + ".len", "Q", len(raw))
        self.add(label, None, raw)

    def to_bytes(self, changes: dict | None = None) -> bytes:
        """The file with changes {label: value} made in place (same format); an unknown label is a test bug."""
        changes = changes or {}
        unknown = set(changes) - {label for label, _, _ in self}
        assert not unknown, f"no such field: {unknown}"
        parts = []
        for label, fmt, value in self:
            value = changes.get(label, value)
            parts.append(value if fmt is None else struct.pack("<" + fmt, value))
        return b"".join(parts)

    def int_fields(self) -> list[tuple[int, str, str]]:
        """(byte offset, label, format) of every integer field: where lying headers lie."""
        out, pos = [], 0
        for label, fmt, value in self:
            if fmt is not None and fmt not in "fd":
                out.append((pos, label, fmt))
            pos += len(value) if fmt is None else struct.calcsize(fmt)
        return out


def gguf_fields(kvs=None, tensors=None, *, version: int = 3, magic: bytes = b"GGUF") -> Fields:
    """A GGUF file, field by field: header, key-values, tensor infos, padding, aligned tensor data."""
    kvs = gguf_kvs() if kvs is None else kvs
    tensors = gguf_tensors() if tensors is None else tensors
    f = Fields()
    f.add("magic", None, magic)
    f.add("version", "I", version)
    f.add("n_tensors", "Q", len(tensors))
    f.add("n_kv", "Q", len(kvs))
    for key, vtype, value in kvs:
        _kv(f, f"kv:{key}", key, vtype, value)
    offset = 0
    for name, qtype, dims, data in tensors:
        t = f"tensor:{name}"
        f.string(t + ".name", name)
        f.add(t + ".n_dims", "I", len(dims))
        for j, d in enumerate(dims):
            f.add(f"{t}.dim{j}", "Q", d)
        f.add(t + ".type", "I", int(qtype))
        f.add(t + ".offset", "Q", offset)
        offset += _padded(len(data))
    f.add("padding", None, bytes(_padded(_size(f)) - _size(f)))
    for name, _, _, data in tensors:
        f.add(f"data:{name}", None, data + bytes(_padded(len(data)) - len(data)))
    return f


class RawArray:
    """An array value given as its encoded elements: a million of them cost one field, not a million."""

    def __init__(self, n: int, data: bytes):
        self.n, self.data = n, data


def _kv(f: Fields, label: str, key: str, vtype, value) -> None:
    f.string(label + ".key", key)
    if isinstance(vtype, tuple):  # (V.ARRAY, element type)
        f.add(label + ".type", "I", int(V.ARRAY))
        f.add(label + ".elem_type", "I", int(vtype[1]))
        if isinstance(value, RawArray):
            f.add(label + ".n", "Q", value.n)
            f.add(label + ".data", None, value.data)
            return
        f.add(label + ".n", "Q", len(value))
        for j, item in enumerate(value):
            _value(f, f"{label}[{j}]", vtype[1], item)
    else:
        f.add(label + ".type", "I", int(vtype))
        _value(f, label + ".value", vtype, value)


def _value(f: Fields, label: str, vtype, value) -> None:
    if vtype == V.STRING:
        f.string(label, value)
    else:
        f.add(label, SCALAR_FORMATS[vtype], value)


def _size(f: Fields) -> int:
    return sum(len(v) if fmt is None else struct.calcsize(fmt) for _, fmt, v in f)


def _padded(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


# --- safetensors --------------------------------------------------------------------------------------------------


def safetensors_parts(seed: int = 0) -> tuple[dict, bytes]:
    """(header, data) of a small valid file: F32, BF16, F16, an empty I64 tensor, and metadata."""
    rng = np.random.default_rng(seed)
    arrays = {"a.weight": ("F32", rng.standard_normal((4, 3)).astype(np.float32)),
              "b.bf16": ("BF16", rng.integers(0, 2**16, (2, 5), dtype=np.uint16)),
              "c.half": ("F16", rng.standard_normal(3).astype(np.float16)),
              "d.empty": ("I64", np.zeros((0, 2), np.int64))}
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, a) in arrays.items():
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    return header, data


def safetensors_bytes(header: dict | bytes | str, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict, or raw JSON text); length overrides the header length field."""
    raw = header.encode() if isinstance(header, str) else header if isinstance(header, bytes) else \
        json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


# --- mutations (fuzzing) ------------------------------------------------------------------------------------------

EDGE_INTS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 63, 64, 65, 255, 256, 2**15, 2**16 - 1, 2**31 - 1,
             2**31, 2**32 - 1, 2**32, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
LIMITS = {"B": 2**8, "b": 2**8, "H": 2**16, "h": 2**16, "I": 2**32, "i": 2**32, "Q": 2**64, "q": 2**64}


def edge_int(rng: random.Random, size: int | None = None) -> int:
    """An edge value (often), a small value or anything (sometimes); masked to the field's width when given."""
    kind = rng.random()
    value = rng.choice(EDGE_INTS) if kind < 0.6 else rng.randrange(64) if kind < 0.8 else rng.getrandbits(64)
    return value % size if size else value


def mutate_bytes(rng: random.Random, data: bytes, hot: int) -> bytes:
    """One blind byte-level mutation; positions favour the first `hot` bytes (the header)."""
    b = bytearray(data)
    pos = rng.randrange(min(hot, len(b)) if rng.random() < 0.8 else len(b)) if b else 0
    op = rng.randrange(5)
    if op == 0 and b:
        b[pos] ^= 1 << rng.randrange(8)
    elif op == 1 and b:
        b[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif op == 2:
        del b[pos:]  # truncation
    elif op == 3:
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    else:
        del b[pos:pos + rng.randrange(1, 9)]
    return bytes(b)


def mutate_gguf(rng: random.Random, fields: Fields, valid: bytes) -> bytes:
    """1-3 mutations: mostly an integer header field set to an edge value, sometimes a blind byte mutation."""
    data, int_fields = valid, fields.int_fields()
    header_end = int_fields[-1][0] + 8
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.7:
            pos, _, fmt = rng.choice(int_fields)
            if pos + struct.calcsize(fmt) <= len(data):
                value = edge_int(rng, LIMITS[fmt])
                data = data[:pos] + struct.pack("<" + fmt.upper(), value) + data[pos + struct.calcsize(fmt):]
        else:
            data = mutate_bytes(rng, data, header_end)
    return data


def _hostile_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return edge_int(rng)
    if kind == 1:
        return -edge_int(rng)
    if kind == 2:
        return rng.choice([0.5, -1.0, 1e308, 2.0, float("nan")])
    if kind == 3:
        return rng.choice(["F32", "BF16", "F8_E4M3", "", "x" * 300, "\u00e9"])
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return [edge_int(rng) for _ in range(rng.randrange(4))]
    if kind == 6:
        return [_hostile_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {"dtype": "F32", "shape": _hostile_json(rng, depth + 1), "data_offsets": _hostile_json(rng, depth + 1)}
    return {rng.choice(["dtype", "shape", "data_offsets", "x"]): _hostile_json(rng, depth + 1)}


def mutate_safetensors(rng: random.Random, header: dict, data: bytes) -> bytes:
    """A JSON-aware lie (a field set to a hostile value, dropped or duplicated), a header length lie, or a blind
    byte mutation, 1-3 times."""
    header = json.loads(json.dumps(header))
    text, length = None, None
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        names = list(header)
        if op < 0.45 and names:
            entry = header[rng.choice(names)]
            if isinstance(entry, dict):
                field = rng.choice(list(entry) + ["x"])
                entry[field] = _hostile_json(rng) if rng.random() < 0.8 else entry.pop(field, None)
        elif op < 0.55 and names:
            header[rng.choice(names)] = _hostile_json(rng)
        elif op < 0.65:
            name = rng.choice(names + ["e.new"])
            text = json.dumps(header)[:-1] + f', {json.dumps(name)}: {json.dumps(_hostile_json(rng))}}}'  # maybe a twin
        elif op < 0.75:
            length = edge_int(rng, 2**64)
    raw = safetensors_bytes(text if text is not None else header, data, length=length)
    if rng.random() < 0.3:
        raw = mutate_bytes(rng, raw, len(raw) - len(data))
    return raw


# --- what the fuzzers call ----------------------------------------------------------------------------------------

# the readers' last-resort messages: seen only when a library refused a file our own checks passed (GGUF has none:
# formats/gguf_reader.py reads the whole file itself)
MISSED_BY_CHECKS = ("the safetensors library refused a checked file",)


def read_gguf_everything(path) -> None:
    """Every consumer of a GGUF file: the float32 loader with its tokenizer, and the int4-keeping NumPy loader."""
    from smolvlm_fast.cpu.weights import load_gguf_weights
    from smolvlm_fast.formats.gguf import load_gguf

    load_gguf(path)
    load_gguf_weights(path)


def read_safetensors_everything(path, torch_path: bool = True) -> None:
    """The NumPy reader, and the torch path (our header check, then the safetensors library)."""
    from smolvlm_fast.formats.safetensors import iter_safetensors_file
    from smolvlm_fast.formats.safetensors import read_safetensors

    read_safetensors(path)
    if torch_path:
        for _ in iter_safetensors_file(path):
            pass
