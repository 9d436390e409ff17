"""A GGUF file's header and tensors, read with struct and NumPy alone, its memory bounded by the file's size.

Files come from strangers, and lying headers (counts, lengths, dims, offsets) are how GGUF parsers get exploited.
The header is walked field by field, every count and length bounded by the bytes left in the file before anything
loops on it. What the walk keeps is compact: numbers as Python numbers, numeric arrays as NumPy arrays (the bytes
the file holds), string arrays as 8 bytes of offset per string, decoded only when read. (gguf.GGUFReader keeps about
1 KB of Python objects per array element: an 8 MB file of a million empty strings cost 1.5 GB.) Tensor data stays
in the memory-mapped file: GGUFFile.data(tensor) is a NumPy view of it.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import CheckpointError

GGUF_MAGIC = b"GGUF"
Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)

# --- header limits (llama.cpp's gguf.cpp enforces the same) ---
GGUF_VERSIONS = (2, 3)
MAX_DIMS = 4                   # GGML_MAX_DIMS
MAX_NAME_BYTES = 63            # GGML_MAX_NAME is 64 with the terminating NUL
DEFAULT_ALIGNMENT = 32
# The sum over all arrays of a file. Real vocabularies need under 800k (Llama 3: 128k tokens + 280k merges + 128k
# types; Gemma: 3 x 256k; SmolLM2: 147k); the limit keeps what the tokenizer builds from them bounded too.
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


class StringArray(Sequence):
    """A GGUF array of strings, each decoded when it is read (the walk has checked that every one is UTF-8)."""

    def __init__(self, buf: mmap.mmap, starts: np.ndarray):
        self._buf, self._starts = buf, starts  # starts[j]: string j's length field; starts[-1]: the array's end

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if not -len(self) <= j < len(self):
            raise IndexError(f"string {j} of {len(self)}")
        j %= len(self)
        return str(self._buf[int(self._starts[j]) + 8:int(self._starts[j + 1])], "utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[j] for j in range(len(self)))

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"


class GGUFTensor(NamedTuple):
    """One tensor's header entry (a tuple: a file may list many, each kept small)."""
    name: str
    dims: tuple[int, ...]      # innermost first, as GGUF lists them
    type: GGMLQuantizationType
    offset: int                # of its data in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Outermost first, as Hugging Face and NumPy list them."""
        return tuple(reversed(self.dims))


@dataclass
class GGUFFile:
    path: Path
    metadata: dict             # key -> str, int, float, bool, a NumPy array or a StringArray
    tensors: list[GGUFTensor]
    file_bytes: np.ndarray = field(repr=False)  # the whole file, memory-mapped, uint8
    mapped: mmap.mmap = field(repr=False)

    def data(self, t: GGUFTensor) -> np.ndarray:
        """A view of the file: F32 / F16 in t.shape; quantized as uint8 rows of blocks [..., rows, row bytes]."""
        raw = self.file_bytes[t.offset:t.offset + t.n_bytes]
        if t.type in (Q.F32, Q.F16):
            return raw.view(np.float32 if t.type == Q.F32 else np.float16).reshape(t.shape)
        block, block_bytes = GGML_QUANT_SIZES[t.type]
        return raw.reshape(*t.shape[:-1], t.dims[0] // block * block_bytes)

    def drop_pages(self, t: GGUFTensor) -> None:
        """Let go of the file pages a converted tensor was read from, so loading never holds the file and its
        converted copy in resident memory at once (they stay in the page cache; reading them again faults them
        back in)."""
        if hasattr(mmap, "MADV_DONTNEED") and t.n_bytes:
            start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
            self.mapped.madvise(mmap.MADV_DONTNEED, start, t.offset + t.n_bytes - start)


def open_gguf(path: str | Path) -> GGUFFile:
    """The file's metadata and tensors, every rule of the format checked; CheckpointError naming the field at the
    first lie."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if (magic := f.read(4)) != GGUF_MAGIC:  # also keeps an empty file (which mmap refuses) out
                raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open GGUF file ({e.strerror or e})") from None
    try:
        metadata, tensors = _walk(_Cursor(mapped, path))
    except BaseException:
        with contextlib.suppress(BufferError):  # nothing views it yet (the walk copies what it keeps), but never mask
            mapped.close()
        raise
    return GGUFFile(path, metadata, tensors, np.frombuffer(mapped, dtype=np.uint8), mapped)


# --- the header walk ----------------------------------------------------------------------------------------------


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


def _walk(c: _Cursor) -> tuple[dict, list[GGUFTensor]]:
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
    del names  # (only the duplicate check needs it)
    return meta, _place_data(c, tensors, alignment)


def _read_kv(c: _Cursor, i: int, meta: dict, elements_left: int):
    """(key, value, array length), the value's type checked against KEY_TYPES for the keys we read."""
    key = c.string(f"metadata key {i}")
    where = f"metadata key {i} {key[:100]!r}"
    if key in meta:
        c.fail(f"{where}: duplicate key")
    vtype = _value_type(c, c.unpack("I", f"{where}: value type"), where, array=True)
    if vtype == V.ARRAY:
        etype = _value_type(c, c.unpack("I", f"{where}: array element type"), f"{where}: array element", array=False)
        n = c.count(f"{where}: array length", MIN_VALUE_BYTES[etype])
        if n > elements_left:
            c.fail(f"{where}: array length {n} passes the limit of {MAX_ARRAY_ELEMENTS} array elements per file")
        signature, value = (V.ARRAY, etype), _read_array(c, where, etype, n)
    else:
        signature, value, n = vtype, _read_scalar(c, f"{where}: value", vtype), 0
    if key in KEY_TYPES and signature not in KEY_TYPES[key]:
        c.fail(f"{where}: value type {_type_name(signature)} does not fit (expected "
               f"{' or '.join(_type_name(t) for t in KEY_TYPES[key])})")
    return key, value, n


def _read_scalar(c: _Cursor, what: str, vtype: GGUFValueType):
    if vtype == V.STRING:
        return c.string(what)
    value = c.unpack(SCALAR_FORMATS[vtype], what)
    return bool(value) if vtype == V.BOOL else value


def _read_array(c: _Cursor, where: str, etype: GGUFValueType, n: int):
    """Strings: a StringArray, each checked now; numbers: a NumPy copy of the file's bytes (bools as bool)."""
    if etype == V.STRING:
        return StringArray(c.buf, _string_starts(c, where, n))
    dtype = np.dtype("<" + SCALAR_FORMATS[etype])
    values = np.frombuffer(c.buf, dtype=dtype, count=n, offset=c.skip(n * dtype.itemsize, f"{where}: array data"))
    return values != 0 if etype == V.BOOL else values.copy()  # a copy: the metadata outlives no view of the file


_LENGTH = struct.Struct("<Q")


def _string_starts(c: _Cursor, where: str, n: int) -> np.ndarray:
    """Where each of n strings starts (its length field), and where the last one ends; each string checked to lie
    inside the file and to be UTF-8. The common case runs without the cursor's messages (a vocabulary is 10^5
    strings; an empty string costs no bytes object); at the first bad string the cursor reads it again and fails
    with its own message."""
    buf, pos, end = c.buf, c.pos, len(c.buf)
    starts = np.empty(n + 1, dtype=np.int64)
    for j in range(n):
        starts[j] = pos
        length = _LENGTH.unpack_from(buf, pos)[0] if end - pos >= 8 else None
        if length is None or length > end - pos - 8 or not (length == 0 or _is_utf8(buf[pos + 8:pos + 8 + length])):
            c.pos = pos
            c.string(f"{where}[{j}]")  # fails, saying what is wrong
        pos += 8 + length
    starts[n] = c.pos = pos
    return starts


def _is_utf8(raw: bytes) -> bool:
    try:
        str(raw, "utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _value_type(c: _Cursor, raw: int, where: str, array: bool) -> GGUFValueType:
    if raw not in V._value2member_map_:
        c.fail(f"{where}: value type {raw} is unknown")
    if raw == V.ARRAY and not array:
        c.fail(f"{where}: arrays of arrays are not supported")
    return V(raw)


def _type_name(signature) -> str:
    return f"ARRAY of {signature[1].name}" if isinstance(signature, tuple) else signature.name


def _read_tensor_info(c: _Cursor, i: int, names: set[str]) -> GGUFTensor:
    """One tensor's name, dims and type, checked; its offset is still the one in the data section."""
    name = c.string(f"tensor {i}: name")
    where = _tensor_where(i, name)
    if len(name.encode()) > MAX_NAME_BYTES:
        c.fail(f"{where}: name is {len(name.encode())} bytes, the limit is {MAX_NAME_BYTES}")
    if name in names:
        c.fail(f"{where}: duplicate tensor name")
    names.add(name)
    n_dims = c.unpack("I", f"{where}: n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(f"{where}: n_dims {n_dims} out of range 1..{MAX_DIMS}")
    dims = tuple(c.unpack("Q", f"{where}: dim {j}") for j in range(n_dims))
    if any(d > INT64_MAX for d in dims):
        c.fail(f"{where}: dims {list(dims)}: a dim is negative as int64")
    qtype = _tensor_type(c, c.unpack("I", f"{where}: type"), where)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    # NumPy refuses a shape whose dims other than 0 multiply past int64, in elements or bytes, even with a 0 in it
    if math.prod(d or 1 for d in dims) * block_bytes > INT64_MAX:
        c.fail(f"{where}: dims {list(dims)}: the element count overflows int64")
    if dims[0] % block:
        c.fail(f"{where}: row length {dims[0]} is not a multiple of {qtype.name}'s block size {block}")
    offset = c.unpack("Q", f"{where}: data offset")
    return GGUFTensor(name, dims, qtype, offset, math.prod(dims) // block * block_bytes)


def _tensor_type(c: _Cursor, raw: int, where: str) -> GGMLQuantizationType:
    if raw not in Q._value2member_map_ or Q(raw) not in GGML_QUANT_SIZES:
        c.fail(f"{where}: type {raw} is unknown")
    if (qtype := Q(raw)) not in SUPPORTED_TYPES:
        c.fail(f"{where}: type {qtype.name} is not supported (only {', '.join(q.name for q in SUPPORTED_TYPES)})")
    return qtype


def _tensor_where(i: int, name: str) -> str:
    return f"tensor {i} {name[:100]!r}"


def _place_data(c: _Cursor, tensors: list[GGUFTensor], alignment: int) -> list[GGUFTensor]:
    """Tensor data: aligned, in header order, one after another (each padded to the alignment), inside the file.
    The tensors come back with their offsets in the file (replaced in place: a long list is not held twice)."""
    start = -(-c.pos // alignment) * alignment
    position = 0
    for i, t in enumerate(tensors):
        where = _tensor_where(i, t.name)
        if t.offset % alignment:
            c.fail(f"{where}: data offset {t.offset} is not a multiple of general.alignment {alignment}")
        if t.offset != position:
            what = "overlaps the previous tensor" if t.offset < position else "leaves a gap after the previous tensor"
            c.fail(f"{where}: data offset {t.offset} {what} (expected {position})")
        if start + t.offset + t.n_bytes > len(c.buf):
            c.fail(f"{where}: data [{start + t.offset}, {start + t.offset + t.n_bytes}) runs past the end of the "
                   f"{len(c.buf)}-byte file (truncated?)")
        tensors[i] = t._replace(offset=start + t.offset)
        position = t.offset + -(-t.n_bytes // alignment) * alignment
    return tensors
